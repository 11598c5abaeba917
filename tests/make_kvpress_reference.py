"""Make tests/data/kvpress_reference.json: which tokens kvpress's presses keep on a tiny random Llama (issue 15).

tests/test_kvpress_equivalence.py reruns our policies on the same inputs and asserts they keep the same tokens.
kvpress pins transformers < 5.3 while this project uses a later 5.x, so this script runs in a side venv and
its output is committed; the test itself needs no kvpress. The JSON was made, from the repository root, by

    python3.11 -m venv "$KVPRESS_VENV"                       # any directory outside the repository
    "$KVPRESS_VENV/bin/pip" install torch==2.13.0            # a CPU build, first, so kvpress pulls no CUDA one
    "$KVPRESS_VENV/bin/pip" install kvpress==0.5.5 transformers==5.2.0
    "$KVPRESS_VENV/bin/python" tests/make_kvpress_reference.py

(this script imports nothing of this project). What it does:

* builds a 2-layer Llama (4 query heads, 2 KV heads, head_dim 8) from a seed, its q/k projections scaled up
  so attention is peaked (with the default 0.02 init every row is near uniform and the attention presses
  would rank tokens by position plus noise), and a prompt of N_TOKENS distinct random ids;
* applies each press the kvpress way, `with press(model): model.model(input_ids, past_key_values=cache)`,
  with the attention implementation its pipeline uses (sdpa; eager for ObservedAttentionPress, which reads
  the attention weights), and reads the kept token indices per layer and KV head back from the compressed
  cache (each kept key row matched to the full cache's; every row is distinct);
* records what our side needs to rebuild the presses' inputs: per attention implementation, the post-RoPE
  queries and keys of every layer (float32, little-endian, base64; eager's only where they differ from
  sdpa's), captured by hooks in the same forward as the press, and checked equal across the press runs of
  one implementation (the forward is deterministic);
* records per press the smallest gap between the last kept and the first evicted score (relative to the
  larger of the two), so a reader sees the kept sets are not decided by rounding: our scores are computed
  in another order (e.g. queries scaled before the product) and agree only to float32 rounding. SEED and
  QK_STD were picked so every gap is >= 1e-3 (other seeds gave SnapKV gaps down to 3e-6).

kvpress has no H2O press with a recent window: its ObservedAttentionPress is H2O-style accumulated attention
but divides each token's sum by the number of queries that see it. The script also records the same press
with that division undone ("observed_attention_sum", the H2O paper's accumulated sum, which our h2o uses).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SEED = 16
N_TOKENS = 128
CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
QK_STD = 0.3  # std of the q_proj / k_proj weights: peaked attention (the default init gives near-uniform rows)
OUT = Path(__file__).parent / "data" / "kvpress_reference.json"

# (name, kvpress class, its options, compression_ratio, attention implementation). The ratios keep a whole
# number of tokens exactly (N_TOKENS * (1 - ratio) is exact in float), so kvpress's int(n * (1 - ratio)) and
# our ceil(budget * n) agree.
PRESSES: list[tuple[str, str, dict[str, Any], float, str]] = [
    ("knorm", "KnormPress", {}, 0.25, "sdpa"),
    ("knorm", "KnormPress", {}, 0.5, "sdpa"),
    ("streamingllm", "StreamingLLMPress", {"n_sink": 4}, 0.5, "sdpa"),
    ("streamingllm", "StreamingLLMPress", {"n_sink": 2}, 0.75, "sdpa"),
    ("snapkv", "SnapKVPress", {}, 0.25, "sdpa"),  # window_size 64, kernel_size 5: kvpress's defaults
    ("snapkv", "SnapKVPress", {"window_size": 16, "kernel_size": 5}, 0.5, "sdpa"),
    ("snapkv", "SnapKVPress", {"window_size": 16, "kernel_size": 5}, 0.5, "eager"),  # kvpress's attentions branch
    ("observed_attention", "ObservedAttentionPress", {}, 0.5, "eager"),
    ("observed_attention_sum", "ObservedAttentionPress", {}, 0.5, "eager"),
]


def b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def build_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, QK_STD)
            layer.self_attn.k_proj.weight.normal_(0.0, QK_STD)
    return model


@dataclass
class Capture:
    """Hooks that record each layer's post-RoPE queries and its full cache keys before any press runs."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]

    def attach(self, model: Any) -> list[Any]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        handles = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn

            def pre(module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
                h = kwargs["hidden_states"]  # (1, n, hidden)
                q = module.q_proj(h).view(1, h.shape[1], -1, module.head_dim).transpose(1, 2)  # (1, q_heads, n, d)
                cos, sin = kwargs["position_embeddings"]
                self.queries[i] = apply_rotary_pos_emb(q, q, cos, sin)[0].detach().clone()

            def post(module: Any, args: tuple, kwargs: dict, output: Any, i: int = i) -> None:
                self.keys[i] = kwargs["past_key_values"].layers[i].keys.detach().clone()  # (1, kv_heads, n, d)

            # registered before the press's hook, so the cache is still full here
            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post, with_kwargs=True))
        return handles


def kept_indices(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Per KV head, the sorted indices of full's rows that kept holds. full (1, h, n, d), kept (1, h, k, d)."""
    out = []
    for h in range(full.shape[1]):
        match = (kept[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # (k, n)
        assert (match.sum(-1) == 1).all(), "a kept key matches no or several cache rows"
        out.append(sorted(match.float().argmax(-1).tolist()))
    return out


def boundary_gap(scores: torch.Tensor, n_kept: int) -> float:
    """Smallest (last kept - first evicted) score over heads, relative to the larger of the two |scores|."""
    top = scores.double().sort(dim=-1, descending=True).values  # (1, h, n)
    a, b = top[..., n_kept - 1], top[..., n_kept]
    gap = (a - b) / torch.maximum(a.abs(), b.abs()).clamp(min=1e-30)
    return float(gap.min())


def main() -> None:
    import kvpress
    from transformers import DynamicCache

    model = build_model()
    # distinct ids: a repeated id has the same layer-0 key up to its rotation, so Knorm would see norm ties
    ids = torch.randperm(CONFIG["vocab_size"], generator=torch.Generator().manual_seed(SEED))[None, :N_TOKENS]
    inputs: dict[str, dict[str, list[torch.Tensor]]] = {}
    records = []
    for name, cls_name, options, ratio, impl in PRESSES:
        press = getattr(kvpress, cls_name)(compression_ratio=ratio, **options)
        scores_seen: list[tuple[torch.Tensor, int]] = []
        score = press.score

        def recording_score(module: Any, *args: Any, score: Any = score, name: str = name,
                            scores_seen: list = scores_seen) -> torch.Tensor:
            s = score(module, *args)
            if name == "observed_attention_sum":  # undo the division by the queries that see each token
                n = s.shape[-1]
                s = s * torch.arange(n, 0, -1, dtype=s.dtype)
            scores_seen.append((s, module.layer_idx))
            return s

        press.score = recording_score  # the instance's score; compress() calls it
        model.set_attn_implementation(impl)
        capture = Capture({}, {})
        handles = capture.attach(model)
        cache = DynamicCache(config=model.config)
        try:
            with torch.no_grad(), press(model):
                model.model(input_ids=ids, past_key_values=cache)
        finally:
            for handle in handles:
                handle.remove()
        layers = range(CONFIG["num_hidden_layers"])
        seen = {"queries": [capture.queries[i] for i in layers], "keys": [capture.keys[i] for i in layers]}
        if impl in inputs:  # every run of one implementation saw the same tensors
            assert all(torch.equal(a, b) for k in seen for a, b in zip(seen[k], inputs[impl][k])), impl
        inputs.setdefault(impl, seen)
        n_kept = int(N_TOKENS * (1 - ratio))
        kept = [kept_indices(capture.keys[i], cache.layers[i].keys) for i in layers]
        assert all(len(head) == n_kept for layer in kept for head in layer)
        records.append(dict(name=name, press=cls_name, options=options, compression_ratio=ratio,
                            attn_implementation=impl, n_kept=n_kept, kept=kept,
                            min_relative_gap=min(boundary_gap(s, n_kept) for s, _ in scores_seen)))
        print(f"{name:24s} {impl:5s} ratio {ratio}: keeps {n_kept}, min relative gap "
              f"{records[-1]['min_relative_gap']:.2e}", file=sys.stderr)
    # eager's tensors where they differ from sdpa's (layer 0 is the same; later layers differ in rounding)
    stored = {"sdpa": {k: [b64(t) for t in v] for k, v in inputs["sdpa"].items()},
              "eager": {k: [None if torch.equal(t, inputs["sdpa"][k][i]) else b64(t) for i, t in enumerate(v)]
                        for k, v in inputs["eager"].items()}}
    data = dict(
        made_by="tests/make_kvpress_reference.py",
        versions={p: importlib.metadata.version(p) for p in ("kvpress", "transformers", "torch")},
        seed=SEED, n_tokens=N_TOKENS, config=CONFIG, qk_std=QK_STD, input_ids=ids[0].tolist(),
        scaling=CONFIG["head_dim"] ** -0.5,
        inputs=stored,  # impl -> queries (1, q_heads, n, d) / keys (1, kv_heads, n, d) per layer; null: as sdpa
        presses=records,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
