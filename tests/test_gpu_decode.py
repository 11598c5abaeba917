"""The compacting static cache on CUDA: the decode step under torch.compile with CUDA graphs ("reduce-overhead").

Skipped without CUDA. Same protocol as tests/test_static_cache.py (a left-padded batch of 70- and 50-token
prompts, an update every 16 tokens, 40 greedy tokens: two evictions during decode), in fp32 so the dynamic
decode is an exact reference; the tolerance is that file's (fp32 sums in another order), see its docstring.
"""

from __future__ import annotations

import pytest
import torch
from adapter_cases import left_pad_tokens, tiny_llama, token_row
from conftest import random_namm_theta

from adapters.causal_lm import CausalLMAdapter
from transfer.namm import NormStats
from transfer.policies.namm import NAMMPolicy
from transfer.policies.recency import Recency
from transfer.static_cache import default_capacity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

UPDATE, NEW_TOKENS, LENGTHS, LOGIT_ATOL = 16, 40, (70, 50), 1e-5


def policy(name: str):
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    return {"recency": lambda: Recency(budget=24), "namm": lambda: NAMMPolicy(random_namm_theta(), norm, budget=0.5)}[
        name]()


def decode(adapter: CausalLMAdapter, name: str, compile: bool | str | None):
    """(batch, NEW_TOKENS, vocab) logits; compile None: the dynamic decode, else the static one."""
    inputs = {k: v.cuda() for k, v in left_pad_tokens([token_row(n, s) for s, n in enumerate(LENGTHS, 1)]).items()}
    memory = adapter.new_memory(policy(name), update_interval=UPDATE, record=True)
    logits = [adapter.prefill(memory, inputs["ids"], inputs["mask"])]
    if compile is None:
        step = lambda token: adapter.prefill(memory, token[:, None])  # noqa: E731
    else:
        decoder = adapter.static_decoder(default_capacity(memory, NEW_TOKENS), compile).load(memory)
        step = decoder.step
    with torch.no_grad():
        for _ in range(NEW_TOKENS - 1):
            logits.append(step(logits[-1].argmax(-1)))
    if compile is not None:
        decoder.sync()
    return torch.stack(logits, dim=1), memory


@pytest.mark.parametrize("name", ["recency", "namm"])
def test_cudagraph_static_decode_equals_dynamic(name):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    adapter = CausalLMAdapter(tiny_llama(kv_heads=2).cuda())
    want, dyn = decode(adapter, name, None)
    got, mem = decode(adapter, name, "reduce-overhead")  # compiles and records the graphs
    assert counters["inductor"]["cudagraph_skips"] == 0, f"CUDA graphs were skipped: {dict(counters['inductor'])}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "greedy tokens differ"
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    assert [(la, sa.tolist()) for la, sa in mem.history] == [(lb, sb.tolist()) for lb, sb in dyn.history]
    # a second decode on the same decoder replays the graphs across its evictions: no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = decode(adapter, name, "reduce-overhead")
    assert torch.equal(again.argmax(-1), got.argmax(-1))  # its first step is compiled too (the first run's was eager)
    torch.testing.assert_close(again, got, atol=LOGIT_ATOL, rtol=0)


def test_static_step_runs_flash_kernels_in_half_precision():
    """The penalty column lets the bf16 decode step run without a mask tensor: SDPA must pick flash attention
    (split over the keys for one query), not the masked memory-efficient or math kernels."""
    from torch.profiler import ProfilerActivity, profile

    adapter = CausalLMAdapter(tiny_llama(kv_heads=2).to("cuda", torch.bfloat16))
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    memory = adapter.new_memory(policy("recency"), update_interval=UPDATE)
    logits = adapter.prefill(memory, ids)
    decoder = adapter.static_decoder(default_capacity(memory, 8)).load(memory)
    decoder.step(logits.argmax(-1))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.step(logits.argmax(-1))
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("flash" in n.lower() for n in names), f"no flash kernel in the static step: {names}"
    decoder.sync()
