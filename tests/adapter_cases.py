"""Tiny random-weight models, one entry per adapter layout, for tests/test_conformance.py.

Adding an adapter = appending one `AdapterCase` to CASES: a seeded builder for a tiny HF model, a way to
make one unpadded input row, a way to batch rows with the family's padding, `run` (the adapter's own
chunked feed + decode, returning a logits-like tensor) and `reference` (the plain HF forward, no memory,
same output layout). Inputs are whatever the family eats (token ids, frames, RL steps): the suite only
ever hands them from `make_row`/`collate` to `run`/`reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from adapters.base import Adapter
from adapters.causal_lm import CausalLMAdapter
from adapters.decision_transformer import DecisionTransformerAdapter
from adapters.gpt2 import GPT2Adapter
from adapters.llava_next_video import LlavaNextVideoAdapter
from adapters.qwen2 import Qwen2Adapter
from transfer.memory import KVMemory

VOCAB = 97
DECODE_STEPS = 12  # logits of the prompt + 11 fed-back greedy tokens: 150 + 11 crosses the update at 160
CHUNK = 24  # prefill chunk that does not divide the update interval


@dataclass(frozen=True)
class AdapterCase:
    name: str
    adapter: type[Adapter]
    build: Callable[[], PreTrainedModel]  # seeded: two calls give identical weights
    make_row: Callable[[int, int], Any]  # (length, seed) -> one unpadded sequence (batch 1)
    collate: Callable[[list[Any]], Any]  # rows -> one batch, padded where the family pads
    run: Callable[[Adapter, KVMemory, Any], torch.Tensor]  # -> (batch, steps, ...) logits-like
    reference: Callable[[PreTrainedModel, Any], torch.Tensor]  # plain HF, no memory, rows of equal length
    heads: int
    kv_heads: int
    lengths: tuple[int, int] = (150, 110)  # long row (every run) and short row (padding check)
    row_outputs: Callable[[torch.Tensor, int], torch.Tensor] = lambda out, length: out  # a row's real outputs
    greedy: bool = True  # outputs are logits whose argmax is fed back: compare the tokens exactly too


# ---------------------------------------------------------------- causal LMs (token ids)
def _randomise_biases(model: PreTrainedModel, names: tuple[str, ...]) -> PreTrainedModel:
    """HF initialises biases to zero; random ones make the bias path matter in the checks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and any(n in name for n in names):
                p.normal_(0.0, 0.5)
    return model.eval()


def tiny_llama(kv_heads: int) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=1024, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2() -> PreTrainedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return _randomise_biases(Qwen2ForCausalLM(cfg), ("q_proj", "k_proj", "v_proj"))


def tiny_gpt2() -> PreTrainedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1,
        scale_attn_by_inverse_layer_idx=True, bos_token_id=None, eos_token_id=None,
    )
    return _randomise_biases(GPT2LMHeadModel(cfg), ("c_attn",))


def token_row(length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, VOCAB, (1, length), generator=g)}


def left_pad_tokens(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(r["ids"].shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = r["ids"].shape[1]
        ids[i, width - n :], mask[i, width - n :] = r["ids"][0], True
    return {"ids": ids, "mask": mask}


def run_causal_lm(adapter: Adapter, memory: KVMemory, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Chunked prefill, then greedy decoding through the memory: (batch, DECODE_STEPS, vocab) logits."""
    logits = [adapter.prefill(memory, inputs["ids"], inputs.get("mask"), chunk_size=CHUNK)]
    for _ in range(DECODE_STEPS - 1):
        token = logits[-1].argmax(-1, keepdim=True)  # (batch, 1)
        logits.append(adapter.prefill(memory, token, torch.ones_like(token, dtype=torch.bool)))
    return torch.stack(logits, dim=1)


@torch.no_grad()
def reference_causal_lm(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy decoding by re-running the plain HF forward on the whole sequence (no cache at all)."""
    ids, logits = inputs["ids"], []
    for _ in range(DECODE_STEPS):
        logits.append(model(ids).logits[:, -1].float())
        ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return torch.stack(logits, dim=1)


def _lm_case(
    name: str, adapter: type[Adapter], build: Callable[[], PreTrainedModel], kv_heads: int
) -> AdapterCase:
    return AdapterCase(
        name=name, adapter=adapter, build=build, make_row=token_row, collate=left_pad_tokens,
        run=run_causal_lm, reference=reference_causal_lm, heads=4, kv_heads=kv_heads,
    )


# ---------------------------------------------------------------- Decision Transformer (RL steps)
DT_STATE, DT_ACT = 11, 3


def tiny_dt() -> PreTrainedModel:
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(0)
    cfg = DecisionTransformerConfig(
        state_dim=DT_STATE, act_dim=DT_ACT, hidden_size=32, n_layer=2, n_head=2, max_ep_len=1000,
        action_tanh=False, initializer_range=0.1,
    )
    cfg.state_mean, cfg.state_std = [0.0] * DT_STATE, [1.0] * DT_STATE
    return DecisionTransformerModel(cfg).eval()


def dt_row(length: int, seed: int) -> dict[str, torch.Tensor]:
    """A teacher-forced episode of `length` steps: returns-to-go, states, actions, timesteps."""
    g = torch.Generator().manual_seed(seed)
    return {
        "rtg": torch.rand(1, length, generator=g) * 3,
        "states": torch.randn(1, length, DT_STATE, generator=g),
        "actions": torch.rand(1, length, DT_ACT, generator=g) * 2 - 1,
        "timesteps": torch.arange(length)[None],
        "alive": torch.ones(1, length, dtype=torch.bool),
    }


def end_pad_steps(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Episodes end at different steps; the finished ones feed padding (alive False), as in a rollout."""
    width = max(r["rtg"].shape[1] for r in rows)
    out = {}
    for key in rows[0]:
        parts = []
        for r in rows:
            pad = torch.zeros(1, width - r[key].shape[1], *r[key].shape[2:], dtype=r[key].dtype)
            parts.append(torch.cat([r[key], pad], dim=1))
        out[key] = torch.cat(parts)
    return out


def run_dt(adapter: Adapter, memory: KVMemory, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One `act` per env step on the persistent cache: (batch, steps, act_dim) predicted actions."""
    preds = []
    for t in range(inputs["rtg"].shape[1]):
        prev = None if t == 0 else inputs["actions"][:, t - 1]
        tokens = adapter.embed(inputs["rtg"][:, t], inputs["states"][:, t], prev, inputs["timesteps"][:, t])
        preds.append(adapter.act(memory, tokens, inputs["alive"][:, t]))
    return torch.stack(preds, dim=1)


@torch.no_grad()
def reference_dt(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's own DecisionTransformerModel.forward over the whole episode (R, s, a interleaved)."""
    out = model(
        states=inputs["states"], actions=inputs["actions"], returns_to_go=inputs["rtg"][..., None],
        timesteps=inputs["timesteps"], attention_mask=inputs["alive"].long(),
    )
    return out.action_preds


# ---------------------------------------------------------------- LLaVA-NeXT-Video (frames + token ids)
VIDEO_ID, IMAGE_ID = VOCAB - 1, VOCAB - 2
FRAMES, FRAME_PX, PREFIX = 16, 56, 6  # 56 px, 14 px patches, 2x2 pooling: 4 tokens a frame, 64 in all


def tiny_llava() -> PreTrainedModel:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=FRAME_PX,
        patch_size=14,
    )
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=text, video_token_index=VIDEO_ID, image_token_index=IMAGE_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="default", spatial_pool_mode="average",
        spatial_pool_stride=2, image_grid_pinpoints=[[FRAME_PX, FRAME_PX]], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def video_row(length: int, seed: int) -> dict[str, torch.Tensor]:
    """`length` tokens: a short text prefix, the video's tokens, then text; plus the frames' pixels."""
    g = torch.Generator().manual_seed(seed)
    n_video = FRAMES * 4
    text = torch.randint(0, IMAGE_ID, (1, length - n_video), generator=g)
    video = torch.full((1, n_video), VIDEO_ID)
    ids = torch.cat([text[:, :PREFIX], video, text[:, PREFIX:]], dim=1)
    return {"ids": ids, "pixels": torch.randn(1, FRAMES, 3, FRAME_PX, FRAME_PX, generator=g)}


def left_pad_video(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {**left_pad_tokens(rows), "pixels": torch.cat([r["pixels"] for r in rows])}


def run_llava(adapter: Adapter, memory: KVMemory, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Merged embeddings prefilled in chunks, then greedy decoding: (batch, DECODE_STEPS, vocab)."""
    embeds = adapter.embed(inputs["ids"], inputs["pixels"])
    logits = [adapter.prefill(memory, embeds, inputs.get("mask"), chunk_size=CHUNK)]
    embed_tokens = adapter.language_model.get_input_embeddings()
    for _ in range(DECODE_STEPS - 1):
        with torch.no_grad():
            step = embed_tokens(logits[-1].argmax(-1, keepdim=True))  # (batch, 1, hidden)
        logits.append(adapter.prefill(memory, step))
    return torch.stack(logits, dim=1)


@torch.no_grad()
def reference_llava(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's own generate (its vision path, mask and cache), raw logits of every step."""
    out = model.generate(
        input_ids=inputs["ids"], attention_mask=torch.ones_like(inputs["ids"]),
        pixel_values_videos=inputs["pixels"], max_new_tokens=DECODE_STEPS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return torch.stack(out.logits, dim=1).float()


CASES: list[AdapterCase] = [
    _lm_case("llama-gqa", CausalLMAdapter, lambda: tiny_llama(kv_heads=2), kv_heads=2),
    _lm_case("llama-mha", CausalLMAdapter, lambda: tiny_llama(kv_heads=4), kv_heads=4),
    _lm_case("qwen2-gqa", Qwen2Adapter, tiny_qwen2, kv_heads=2),
    _lm_case("gpt2", GPT2Adapter, tiny_gpt2, kv_heads=4),
    AdapterCase(
        name="decision-transformer", adapter=DecisionTransformerAdapter, build=tiny_dt, make_row=dt_row,
        collate=end_pad_steps, run=run_dt, reference=reference_dt, heads=2, kv_heads=2, lengths=(50, 35),
        row_outputs=lambda out, length: out[:length], greedy=False,
    ),
    AdapterCase(
        name="llava-next-video", adapter=LlavaNextVideoAdapter, build=tiny_llava, make_row=video_row,
        collate=left_pad_video, run=run_llava, reference=reference_llava, heads=4, kv_heads=2,
    ),
]
