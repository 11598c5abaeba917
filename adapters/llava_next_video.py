"""LLaVA-NeXT-Video (HF `LlavaNextVideoForConditionalGeneration`): the memory manages the LM's KV cache.

The vision tower and projector run once per video, outside any memory; their features replace the
video-token embeddings exactly as `LlavaNextVideoModel.forward` does (masked_scatter in token order),
and the merged embeddings go through the Llama language model in update-aligned chunks under the
memory. Several questions about one video share one compressed cache: the video context (everything
up to the last video token) is compressed once, snapshotted, and restored before each question.

transformers 5.17 and 5.23 both take `get_video_features(pixel_values, ..., return_dict=True)` with
the pixels positional (the keyword was renamed); 5.17 returns `pooler_output` as a per-video tuple of
(frames, tokens, hidden), 5.23 as one (batch, frames * tokens, hidden) tensor. Both flatten to the
same (video tokens, hidden) rows, which is all `video_features` relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import PreTrainedModel

from adapters.base import Adapter, greedy_decode
from transfer.memory import KVMemory


def default_prompt(question: str) -> str:
    """LLaVA-NeXT-Video's USER/ASSISTANT template (the one the shipped tiny model is trained with)."""
    from train.video import build_prompt

    return build_prompt(question)


class LlavaNextVideoAdapter(Adapter):
    family: ClassVar[str] = "llava_next_video"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next_video",)

    def __init__(self, model: PreTrainedModel, processor: Any = None) -> None:
        super().__init__(model)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", dtype: Any = None) -> LlavaNextVideoAdapter:
        """Model + processor (HF's where torchvision exists, else the torch-only TinyVideoProcessor)."""
        from transformers import LlavaNextVideoForConditionalGeneration

        from train.video import load_processor

        looks_local = str(id_or_path).startswith((".", "/")) or Path(id_or_path).exists()
        if looks_local and not (Path(id_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"{id_or_path}: no LLaVA-NeXT-Video model here (config.json missing)")
        model = LlavaNextVideoForConditionalGeneration.from_pretrained(id_or_path, dtype=dtype)
        if model.config.model_type not in cls.model_types:
            raise ValueError(f"{id_or_path}: model type {model.config.model_type!r} is not llava_next_video")
        return cls(model.to(device), load_processor(id_or_path))

    # ------------------------------------------------------------------------------------ embeddings
    @property
    def video_token_id(self) -> int:
        cfg = self.model.config
        token = getattr(cfg, "video_token_id", None)
        return int(token if token is not None else cfg.video_token_index)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 3, H, W) -> (batch * frames * tokens_per_frame, hidden), in token order."""
        cfg = self.model.config
        pixel = pixel_values_videos.to(self.device, self.model.dtype)
        with torch.no_grad():
            out = self.model.model.get_video_features(
                pixel,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            )
        feats = out.pooler_output
        hidden = self.text_config.hidden_size
        if isinstance(feats, (list, tuple)):  # transformers 5.17: one (frames, tokens, hidden) per video
            return torch.cat([f.reshape(-1, hidden) for f in feats])
        return feats.reshape(-1, hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the video features at the video-token positions, (batch, n, hidden)."""
        input_ids = input_ids.to(self.device)
        with torch.no_grad():
            embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.video_token_id  # (batch, n)
        n_video = int(mask.sum())
        if pixel_values_videos is None:
            if n_video:
                raise ValueError(f"prompt holds {n_video} video tokens but no video was given")
            return embeds
        feats = self.video_features(pixel_values_videos).to(embeds.dtype)
        if n_video != feats.shape[0]:
            raise ValueError(f"prompt holds {n_video} video tokens but the video gives {feats.shape[0]} features")
        return embeds.masked_scatter(mask[..., None], feats)

    # ------------------------------------------------------------------------------------ prefill / decode
    def prefill(
        self,
        memory: KVMemory,
        inputs_embeds: torch.Tensor,
        valid: torch.Tensor | None = None,
        chunk_size: int = 512,
    ) -> torch.Tensor:
        """Feed merged embeddings (batch, n, hidden) through the LM; returns next-token logits (batch, vocab)."""
        inputs_embeds = inputs_embeds.to(self.device)
        batch, n = inputs_embeds.shape[:2]
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool)
        valid = valid.bool().to(self.device)

        def forward(start: int, end: int, positions: torch.Tensor) -> torch.Tensor:
            hidden = self.language_model(
                inputs_embeds=inputs_embeds[:, start:end],
                position_ids=positions,
                past_key_values=memory.cache,
                use_cache=True,
            ).last_hidden_state
            return self.model.lm_head(hidden[:, -1]).float()

        return self.feed(memory, n, forward, valid, chunk_size)

    def decode(
        self, memory: KVMemory, logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> torch.Tensor:
        """Greedy decoding from the prefill's logits; returns (batch, <= max_new_tokens), EOS-padded."""
        embed_tokens = self.language_model.get_input_embeddings()

        def step(token: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                embeds = embed_tokens(token[:, None])  # (batch, 1, hidden)
            return self.prefill(memory, embeds)

        return greedy_decode(logits, step, max_new_tokens, eos_token_id)

    def generate(
        self,
        memory: KVMemory,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        chunk_size: int = 512,
    ) -> torch.Tensor:
        """Prefill video + prompt under the memory, then greedy-decode; (batch, <= max_new_tokens) ids."""
        logits = self.prefill(memory, self.embed(input_ids, pixel_values_videos), chunk_size=chunk_size)
        return self.decode(memory, logits, max_new_tokens, self._eos_id())

    def _eos_id(self) -> int | None:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.text_config.eos_token_id
        return eos[0] if isinstance(eos, (list, tuple)) else eos

    # ------------------------------------------------------------------------------------ video QA
    def encode(
        self, frames: np.ndarray, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Pixels once, token ids per prompt, and where the shared video context ends.

        Returns pixel_values_videos (1, frames, 3, H, W), ids [(1, n_i)] and `split`: every prompt's
        first `split` ids (up to and including the last video token) are identical.
        """
        if self.processor is None:
            raise ValueError("this adapter has no processor; build it with from_pretrained or pass one")
        if not prompts:
            raise ValueError("no questions given")
        proc = self.processor
        for p in prompts:
            if p.count(proc.video_token) != 1:
                raise ValueError(f"prompt {p!r} needs exactly one video placeholder ({proc.video_token})")
        enc = proc(text=prompts[0], videos=frames, return_tensors="pt")
        first = enc["input_ids"]
        n_video = int((first == self.video_token_id).sum())
        # The other prompts only need tokens: expand the placeholder as the processor did.
        tokenizer = getattr(proc, "tokenizer", proc)
        ids = [
            tokenizer(p.replace(proc.video_token, proc.video_token * n_video), return_tensors="pt")["input_ids"]
            for p in prompts
        ]
        if not torch.equal(ids[0], first):
            raise ValueError("the processor expands video placeholders differently from video_token * n")
        split = int(torch.nonzero(first[0] == self.video_token_id)[-1]) + 1
        for p, q in zip(prompts, ids):
            if q.shape[1] <= split or not torch.equal(q[:, :split], first[:, :split]):
                raise ValueError(f"prompt {p!r} does not share the video context of the first prompt")
        return enc["pixel_values_videos"], ids, split

    def answer_many(
        self,
        memory: KVMemory,
        frames: np.ndarray,
        questions: Sequence[str],
        max_new_tokens: int = 32,
        prompt_fn: Callable[[str], str] = default_prompt,
        chunk_size: int = 512,
    ) -> tuple[list[str], list[float]]:
        """Answer every question about one video from one compressed video context.

        The context is fed once under the memory and snapshotted; each question restores the snapshot,
        feeds its own tokens and decodes greedily. Returns (replies, kept fraction per question).
        """
        pixel, ids, split = self.encode(frames, [prompt_fn(q) for q in questions])
        self.prefill(memory, self.embed(ids[0][:, :split], pixel), chunk_size=chunk_size)
        snap = memory.snapshot()
        embed_tokens = self.language_model.get_input_embeddings()
        replies, kept = [], []
        for q_ids in ids:
            memory.restore(snap)
            with torch.no_grad():
                q_embeds = embed_tokens(q_ids[:, split:].to(self.device))
            logits = self.prefill(memory, q_embeds, chunk_size=chunk_size)
            out = self.decode(memory, logits, max_new_tokens, self._eos_id())
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            replies.append(tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip())
            kept.append(float(memory.kept_fraction()[0]))
        return replies, kept
