"""The compacting static cache (transfer/static_cache.py) against the dynamic decode path.

Every run: a left-padded batch of two prompts of different lengths (70 and 50 tokens; 100 and 80 with
the video), update every 16 tokens, 40 greedy tokens, so the decode crosses two updates that evict.

Tolerance. Both paths compute in fp32 from the same weights; the static step attends over the whole
capacity with the free entries penalised (their weight is exactly 0), the dynamic one over the live entries
only, so the same sums run in another order. Each attention output then differs by a few fp32 ulps
(eps = 1.2e-7) of its size; through the layers and the LM head that is ~1e-6 on logits of size ~3
(measured over every case here: at most 1.5e-6, logits up to 3.5). LOGIT_ATOL = 1e-5 leaves 6x of room,
while a cache that holds one wrong key or position moves logits by more than 1e-3
(`test_tolerance_sees_a_wrong_cache`).
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from adapter_cases import (
    left_pad_tokens,
    left_pad_video,
    tiny_gpt2,
    tiny_llama,
    tiny_llava,
    tiny_qwen2,
    token_row,
    video_row,
)
from conftest import random_namm_theta

from adapters import ADAPTERS
from adapters.causal_lm import CausalLMAdapter
from adapters.gpt2 import GPT2Adapter
from adapters.llava_next_video import LlavaNextVideoAdapter
from adapters.qwen2 import Qwen2Adapter
from transfer.namm import NormStats
from transfer.policies.full import FullCache
from transfer.policies.namm import NAMMPolicy
from transfer.policies.recency import Recency
from transfer.static_cache import CapacityError, StaticDecoder, default_capacity

UPDATE = 16
NEW_TOKENS = 40  # 39 fed back: fed slots 80 -> 119, updates at 96 and 112
LENGTHS = (70, 50)
LOGIT_ATOL = 1e-5

MODELS = {
    "llama-gqa": (CausalLMAdapter, lambda: tiny_llama(kv_heads=2)),
    "qwen2-gqa": (Qwen2Adapter, tiny_qwen2),
    "gpt2": (GPT2Adapter, tiny_gpt2),
    "llava-next-video": (LlavaNextVideoAdapter, tiny_llava),
}


def make_policy(name: str):
    """Fresh policy objects (per-sequence state lives in the memory, so two runs never share any)."""
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    return {
        "full": lambda: FullCache(),
        "recency": lambda: Recency(budget=24),
        "recency-frac": lambda: Recency(budget=0.3),  # per-row budgets on the padded batch: ragged Selection
        "namm": lambda: NAMMPolicy(random_namm_theta(), norm),  # the reference rule: no token budget
        "namm-budget": lambda: NAMMPolicy(random_namm_theta(), norm, budget=0.5),
    }[name]()


@functools.cache
def adapter(model: str):
    cls, build = MODELS[model]
    return cls(build())


def prompts(model: str) -> dict[str, torch.Tensor]:
    if model == "llava-next-video":  # 64 video tokens each: 100 and 80 tokens, padded to 112; updates at 128, 144
        return left_pad_video([video_row(n + 30, seed) for seed, n in enumerate(LENGTHS, 1)])
    return left_pad_tokens([token_row(n, seed) for seed, n in enumerate(LENGTHS, 1)])


def prefill(model: str, policy: str):
    ad = adapter(model)
    memory = ad.new_memory(make_policy(policy), update_interval=UPDATE, record=True)
    inputs = prompts(model)
    if model == "llava-next-video":
        logits = ad.prefill(memory, ad.embed(inputs["ids"], inputs["pixels"]), inputs["mask"])
    else:
        logits = ad.prefill(memory, inputs["ids"], inputs["mask"])
    return ad, memory, logits


def dynamic_step(model: str, ad, memory):
    if model == "llava-next-video":
        embed = ad.language_model.get_input_embeddings()
        return lambda token: ad.prefill(memory, embed(token[:, None]))
    return lambda token: ad.prefill(memory, token[:, None])


def greedy(logits: torch.Tensor, step) -> torch.Tensor:
    """(batch, NEW_TOKENS, vocab): the prefill's logits and those of the 39 fed-back greedy tokens."""
    out = [logits]
    for _ in range(NEW_TOKENS - 1):
        out.append(step(out[-1].argmax(-1)))
    return torch.stack(out, dim=1)


@functools.cache
def dynamic_run(model: str, policy: str):
    ad, memory, logits = prefill(model, policy)
    with torch.no_grad():
        return greedy(logits, dynamic_step(model, ad, memory)), memory


def static_run(model: str, policy: str, compile: bool | str = False, capacity: int | None = None):
    ad, memory, logits = prefill(model, policy)
    n_updates = len(memory.kept_log)
    decoder = ad.static_decoder(capacity or default_capacity(memory, NEW_TOKENS), compile).load(memory)
    out = greedy(logits, decoder.step)
    decoder.sync()
    return out, memory, decoder, n_updates


def assert_same_decode(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "greedy tokens differ"
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


# ---------------------------------------------------------------- exactness against the dynamic path
# every family with full, recency and the NAMM's reference rule; ragged per-row budgets (a padded batch under
# a fractional budget keeps different counts per row) on Llama only: that logic does not depend on the family
PAIRS = [(m, p) for m in MODELS for p in ("full", "recency", "namm")] + [
    ("llama-gqa", "recency-frac"), ("llama-gqa", "namm-budget")]


@pytest.mark.parametrize(("model", "policy"), PAIRS)
def test_static_decode_equals_dynamic(model, policy):
    want, dyn = dynamic_run(model, policy)
    got, mem, decoder, n_prefill_updates = static_run(model, policy)
    n_layers = len(mem.cache.layers)
    assert len(mem.kept_log) - n_prefill_updates == 2 * n_layers, "the decode must cross two updates"
    assert_same_decode(got, want)
    if policy != "full":  # the decode's updates really evicted
        assert max(mem.cache_tokens()) < mem.n_fed
    if policy not in ("full", "namm"):  # a token budget: the static cache is smaller than the full one
        assert decoder.capacity < mem.n_fed
    # the memory gets back what the dynamic decode leaves: same entries, counters and reports
    assert mem.n_fed == dyn.n_fed and torch.equal(mem.n_seen, dyn.n_seen)
    assert mem.cache_tokens() == dyn.cache_tokens()
    for i in range(n_layers):
        a, b = mem.layers[i], dyn.layers[i]
        assert torch.equal(a.slots, b.slots) and torch.equal(a.valid, b.valid) and a.n_new == b.n_new
        torch.testing.assert_close(mem.cache.layers[i].keys, dyn.cache.layers[i].keys, atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(mem.cache.layers[i].values, dyn.cache.layers[i].values, atol=LOGIT_ATOL, rtol=0)
    assert len(mem.history) == len(dyn.history)
    for (la, sa), (lb, sb) in zip(mem.history, dyn.history):
        assert la == lb and torch.equal(sa, sb), "every update kept the same slots"
    torch.testing.assert_close(mem.kept_fraction(), dyn.kept_fraction(), atol=0, rtol=0)


def test_tolerance_sees_a_wrong_cache():
    """One key fewer (the oldest kept one masked out in every layer) moves logits far beyond LOGIT_ATOL."""
    want, _ = dynamic_run("llama-gqa", "recency")
    ad, memory, logits = prefill("llama-gqa", "recency")
    decoder = ad.static_decoder(default_capacity(memory, NEW_TOKENS)).load(memory)
    for i, valid in enumerate(decoder.state.valid):
        assert bool(valid[:, :, 0].all())  # recency kept 24 valid entries per row; drop the oldest
        valid[:, :, 0] = False
        decoder.state.mark(i)
    got = decoder.step(logits.argmax(-1))
    decoder.sync()
    assert (got - want[:, 1]).abs().max() > 100 * LOGIT_ATOL


def test_generate_api_static_equals_dynamic():
    """The adapters' own entry points: generate(static=True) and the video adapter's decode(static=True)."""
    ad = adapter("llama-gqa")
    inputs = prompts("llama-gqa")
    tokens = {}
    for static in (False, True):
        memory = ad.new_memory(make_policy("recency"), update_interval=UPDATE)
        tokens[static] = ad.generate(memory, inputs["ids"], inputs["mask"], NEW_TOKENS, static=static)
    assert torch.equal(tokens[True], tokens[False])
    video = adapter("llava-next-video")
    out = {}
    for static in (False, True):
        _, memory, logits = prefill("llava-next-video", "recency")
        out[static] = video.decode(memory, logits, NEW_TOKENS, static=static)
    assert torch.equal(out[True], out[False])


def test_every_adapter_that_decodes_has_a_static_step():
    """Adapters with a greedy decode serve the static path; the Decision Transformer (no tokens) does not."""
    decoding = [cls for cls in ADAPTERS if any(hasattr(cls, m) for m in ("generate", "decode"))]
    assert {CausalLMAdapter, GPT2Adapter, Qwen2Adapter, LlavaNextVideoAdapter} <= set(decoding)
    for cls in decoding:
        assert "static_forward" in {k for c in cls.__mro__[:-1] if c.__name__ != "Adapter" for k in vars(c)}, cls


# ---------------------------------------------------------------- positions and capacity
def test_positions_stay_absolute_after_compaction():
    """After two compactions each row's next position is its count of tokens seen (not the cache fill),
    the kept entries keep their absolute slots, and their keys keep the rotation they were written with."""
    ad, memory, logits = prefill("llama-gqa", "recency")
    decoder = ad.static_decoder(default_capacity(memory, NEW_TOKENS)).load(memory)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())

    hook = ad.model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    try:
        greedy(logits, decoder.step)
    finally:
        hook.remove()
    start = torch.tensor(LENGTHS)[:, None]  # valid tokens each row has seen after its prompt
    assert torch.equal(torch.cat(seen, dim=1), start + torch.arange(NEW_TOKENS - 1))
    fill = decoder._fill[0]
    assert fill < memory.n_fed - (NEW_TOKENS - 1), "the cache was compacted below the prompt's length"
    s = decoder.state
    _, dyn = dynamic_run("llama-gqa", "recency")
    for i in range(len(s.keys)):
        n = decoder._fill[i]
        assert torch.equal(s.slots[i][:, :, :n], dyn.layers[i].slots)  # absolute fed indices, token order
        assert bool((s.slots[i][:, :, :n].diff(dim=-1) > 0).all())
        assert not bool(s.valid[i][:, :, n:].any()), "entries past the pointer are free"
        torch.testing.assert_close(s.keys[i][:, :, :n, : s.head_dim], dyn.cache.layers[i].keys, atol=LOGIT_ATOL,
                                   rtol=0)
        penalised = s.keys[i][..., s.head_dim] < 0  # the attention's validity: the penalty column
        assert torch.equal(penalised, ~s.valid[i]) and not bool(s.keys[i][..., s.head_dim + 1 :].any())
    decoder.sync()


def test_capacity_overflow_is_one_clear_error():
    """A policy that keeps more than the capacity allows (here the full cache, which keeps every token, like
    the NAMM's reference rule may) fails at the step that would overflow, naming the layer and the fix,
    before anything is written; a cache already too large fails at load."""
    ad, memory, logits = prefill("llama-gqa", "full")
    cap = max(memory.cache_tokens()) + 5
    decoder = ad.static_decoder(cap).load(memory)
    token = logits.argmax(-1)
    for _ in range(5):
        token = decoder.step(token).argmax(-1)
    fill = list(decoder._fill)
    with pytest.raises(CapacityError, match=r"static cache full: layer 0 holds \d+ entries \(capacity \d+\).*"
                                            r"update_interval=16"):
        decoder.step(token)
    assert decoder._fill == fill and memory.n_fed == fill[0]
    _, memory, _ = prefill("llama-gqa", "full")
    with pytest.raises(CapacityError, match="already holds"):
        StaticDecoder(ad.model, ad.static_forward, capacity=max(memory.cache_tokens())).load(memory)


def test_sliding_window_layers_match_dynamic():
    """Qwen2 with sliding-window layers: the static step applies the window by slot, as the memory's mask."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=40, max_window_layers=1,
    )
    ad = Qwen2Adapter(Qwen2ForCausalLM(cfg).eval())
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(1))
    out = {}
    for static in (False, True):
        memory = ad.new_memory(make_policy("full"), update_interval=UPDATE)
        logits = ad.prefill(memory, ids)
        if static:
            decoder = ad.static_decoder(default_capacity(memory, NEW_TOKENS)).load(memory)
            out[static] = greedy(logits, decoder.step)
            decoder.sync()
            windows = [w for _, w in decoder.state.layer_args.values()]
            assert 40 in windows and None in windows, "one layer slides, the other attends to everything"
        else:
            out[static] = greedy(logits, dynamic_step("qwen2-gqa", ad, memory))
    assert_same_decode(out[True], out[False])
    with torch.no_grad():  # and HF's own generate (its sliding-window cache and mask) agrees
        ref = ad.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[:, 120:]
    assert torch.equal(out[True].argmax(-1), ref)


def test_gpt2_static_decode_refuses_to_run_past_its_position_table():
    ad, memory, logits = prefill("gpt2", "recency")  # 70 tokens seen, 256 positions
    with pytest.raises(ValueError, match="256 learned positions; this decode would need 257"):
        ad.static_decode(memory, logits, 256 - 70 + 2)
    assert memory.n_fed == 80  # nothing was fed


def test_default_capacity_is_budget_plus_interval():
    _, memory, _ = prefill("llama-gqa", "recency")
    assert default_capacity(memory, NEW_TOKENS) == 48  # 24 kept + 16 new, rounded up to 16
    _, memory, _ = prefill("llama-gqa", "full")
    assert default_capacity(memory, NEW_TOKENS) == 128  # 80 fed + 40 new: the full bound, rounded up


# ---------------------------------------------------------------- compiled step
def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    if shutil.which("gcc") is None and shutil.which("g++") is None and shutil.which("clang") is None:
        return "inductor needs a C++ compiler on the CPU (none found)"
    return None


@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
@pytest.mark.parametrize("policy", ["recency", "namm-budget"])  # the NAMM: the step also buffers queries
def test_compiled_static_step_equals_eager_and_never_recompiles(policy):
    """torch.compile (inductor, fullgraph) of the static step: same tokens and logits as the eager static step
    across two evictions, and the updates between compiled steps cause no recompilation."""
    import torch._dynamo

    eager, *_ = static_run("llama-gqa", policy)
    torch._dynamo.reset()
    ad, memory, logits = prefill("llama-gqa", policy)
    decoder = ad.static_decoder(default_capacity(memory, NEW_TOKENS), compile=True).load(memory)
    token = logits.argmax(-1)
    for _ in range(2):  # the first step runs eagerly (it records each layer's scaling), the second compiles
        token = decoder.step(token).argmax(-1)
    # restart from the prefill with the compiled step in place: from here on no recompile is allowed
    ad, memory, logits = prefill("llama-gqa", policy)
    decoder.load(memory)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = greedy(logits, decoder.step)
    decoder.sync()
    assert_same_decode(got, eager)


@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
@pytest.mark.parametrize("model", ["qwen2-gqa", "gpt2", "llava-next-video"])
def test_every_decoding_family_compiles_in_one_graph(model):
    """The static step of each decoding family compiles with fullgraph=True (no graph break) and decodes as
    the dynamic path does across two evictions (Llama: the test above)."""
    import torch._dynamo

    torch._dynamo.reset()
    policy = "namm" if model == "llava-next-video" else "recency"
    want, _ = dynamic_run(model, policy)
    got, *_ = static_run(model, policy, compile=True)
    assert_same_decode(got, want)
