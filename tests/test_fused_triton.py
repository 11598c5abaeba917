"""The Triton kernel of the fused features (transfer/fused_triton.py) against the torch blocks, on the CPU in
Triton's interpreter; skipped where Triton is not installed (the CPU CI). tests/test_gpu.py runs it compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused import NORM, _case, _close

from transfer import fused
from transfer.namm import NAMMParams, select_keep

triton = pytest.importorskip("triton")
# Triton picks interpreted or compiled kernels when it is imported: these tests need TRITON_INTERPRET=1 from the
# start, so `test_in_the_interpreter` runs them in a child pytest with it (pytest -k interpreted runs them directly)
interpreted = pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="needs TRITON_INTERPRET=1 at import")


@pytest.mark.skipif(triton.knobs.runtime.interpret, reason="already in the interpreter")
def test_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@interpreted
@pytest.mark.parametrize("kind", ["causal", "ragged", "first"])
def test_interpreted_kernel_equals_torch_blocks(monkeypatch, kind):
    """Features to fp32 rounding (test_fused's rule), scores to its score tolerance, the same decisions."""
    inp, bufs = _case(kind)
    _compare(monkeypatch, inp, bufs, kind)


@interpreted
@pytest.mark.parametrize("kind", ["ragged", "first"])
def test_interpreted_normaliser_kernel_equals_the_first_pass(monkeypatch, kind):
    """The normaliser kernel's log-sum-exp equals fused.py's first pass to fp32 rounding (-inf where a row
    sees no key: the left padding of 'first')."""
    inp, _ = _case(kind)
    ref = fused.attention_lse(inp)
    monkeypatch.setattr(fused, "KERNEL", "triton")
    got = fused.attention_lse(inp)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and bool(torch.isinf(ref).any()) == (kind == "first")
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-6, atol=1e-6)


@interpreted
def test_interpreted_kernel_in_half_precision(monkeypatch):
    """fp16 queries and keys: logits and probabilities rounded to fp16 on both paths, as the slice rounds them.
    A probability on an fp16 rounding boundary may round the other way (2^-11 relative), hence rtol 1e-3.
    (The interpreter's bf16 matrix product is wrong, so bf16 is covered on CUDA only: tests/test_gpu.py.)"""
    inp, bufs = _case("ragged")
    inp.queries, inp.keys = inp.queries.half(), inp.keys.half()
    ref = fused.attention_features(inp, bufs)
    monkeypatch.setattr(fused, "KERNEL", "triton")
    got = fused.attention_features(inp, bufs)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


def _compare(monkeypatch, inp, bufs, kind: str) -> None:
    from conftest import random_namm_theta

    params = NAMMParams.from_flat(random_namm_theta())
    valid = None if kind == "causal" else inp.valid
    ref_scores, ref = fused.fused_namm_score(inp, bufs, inp.slots, params, NORM, valid=valid)
    monkeypatch.setattr(fused, "KERNEL", "triton")
    calls = []
    from transfer import fused_triton

    kernel = fused_triton.features
    monkeypatch.setattr(fused_triton, "features", lambda *a: calls.append(1) or kernel(*a))
    scores, got = fused.fused_namm_score(inp, bufs, inp.slots, params, NORM, valid=valid)
    assert calls, "the kernel path was not taken"
    _close(got.ema, ref.ema)
    _close(got.context, ref.context)
    fin = torch.isfinite(ref_scores)
    torch.testing.assert_close(scores[fin], ref_scores[fin], rtol=1e-4, atol=1e-4)
    for max_keep in (None, 60):
        kept, ref_kept = (select_keep(s, valid, 0.0, max_keep)[0] for s in (scores, ref_scores))
        assert torch.equal(kept, ref_kept)


@interpreted
def test_interpreted_unsupported_cases_stay_on_torch(monkeypatch):
    """A sliding window (the slot comparison) is not the kernel's case: the torch blocks serve it."""
    from transfer import fused_triton

    inp, _ = _case("window")
    assert not fused_triton.supported(inp, fused.DEFAULT_CONFIG)
    inp2, _ = _case("ragged")
    assert fused_triton.supported(inp2, fused.DEFAULT_CONFIG)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    assert not fused_triton.supported(inp2, fused.DEFAULT_CONFIG)  # CPU tensors without the interpreter
