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

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import PreTrainedModel

from adapters.base import Adapter, greedy_decode
from adapters.torch_video_processor import encode_video_prompts
from transfer.atomic import read_json
from transfer.memory import KVMemory
from transfer.static_cache import StaticKV

# ------------------------------------------------------------------------------------ runtime of the tiny model
# Everything evaluation needs to run the shipped tiny model (prompt, processor, tokenizer files); the
# trainer (train/video.py) builds on these and adds only what training needs (vocabulary, data, loop).
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, VIDEO_TOKEN]
PATCH = 14
TINY_SIZE = 112  # the tiny model's square frames (8 x 8 patches, pooled 2x2 to 16 tokens)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_prompt(question_text: str, visual: str = VIDEO_TOKEN) -> str:
    """LLaVA-NeXT-Video's USER/ASSISTANT template (the one the shipped tiny model is trained with).

    ``visual`` is what stands for the video: one ``<video>`` placeholder (all frames), or with subtitles
    an interleaved string holding one placeholder per frame (see ``LlavaNextVideoAdapter.encode``).
    """
    return f"USER: {visual}\n{question_text} ASSISTANT:"


def default_prompt(question: str) -> str:
    """The prompt every question gets unless the evaluator passes its own ``prompt_fn``."""
    return build_prompt(question)


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """Word-level tokenizer over the words of ``texts`` (``tokenizers`` WordLevel + Whitespace).

    The tiny model's vocabulary is every word its prompts can hold, so nothing maps to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    return fast


def resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    """Resize (F, H, W, 3) uint8 frames to size x size with antialiased bilinear filtering.

    Done in torch after decoding so that every video backend gives identical pixels for one video.
    """
    if size is None or frames.shape[1:3] == (size, size):
        return frames
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _read_config(path: Path) -> dict:
    return read_json(path, "video processor config", dict)


@dataclass
class TinyVideoProcessor:
    """Torch-only stand-in for ``LlavaNextVideoProcessor`` (same outputs for square frames of ``size``).

    Frames are resized to size x size (antialiased bilinear; HF uses bicubic, identical when the input
    is already ``size``), rescaled to [0, 1] and CLIP-normalised; each ``<video>`` placeholder is
    expanded to frames x tokens_per_frame video tokens.
    """

    tokenizer: Any
    size: int = TINY_SIZE
    patch_size: int = PATCH
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    video_token: str = VIDEO_TOKEN

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch_size) ** 2 // 4  # 2x2 average pooling of the patch grid

    def preprocess_video(self, frames: Any) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, size, size) float."""
        x = torch.as_tensor(resize_frames(np.asarray(frames), self.size)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, text: str | list[str], videos: Any = None, return_tensors: str = "pt") -> dict:
        return encode_video_prompts(self, text, videos)

    def batch_decode(self, ids: Any, **kw: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kw)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Tokenizer files plus HF-style processor configs (``LlavaNextVideoProcessor`` keys)."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        proc = {"processor_class": "LlavaNextVideoProcessor", "patch_size": self.patch_size,
                "vision_feature_select_strategy": "default", "video_token": self.video_token,
                "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1}
        video = {"video_processor_type": "LlavaNextVideoVideoProcessor", "processor_class": "LlavaNextVideoProcessor",
                 "do_resize": True, "size": {"shortest_edge": self.size}, "do_center_crop": True,
                 "crop_size": {"height": self.size, "width": self.size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.image_mean),
                 "image_std": list(self.image_std), "do_convert_rgb": True, "resample": 3}
        image = {**{k: v for k, v in video.items() if k != "video_processor_type"},
                 "image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": [[self.size, self.size]],
                 "do_pad": True}
        for name, cfg in [("processor_config.json", proc), ("video_preprocessor_config.json", video),
                          ("preprocessor_config.json", image)]:
            (out_dir / name).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TinyVideoProcessor:
        """Read what ``save_pretrained`` wrote; a missing or malformed file is an error, never a default."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        video = _read_config(path / "video_preprocessor_config.json")
        proc = _read_config(path / "processor_config.json")
        try:
            size = int(video["crop_size"]["height"])
            kwargs = dict(patch_size=int(proc["patch_size"]), image_mean=tuple(video["image_mean"]),
                          image_std=tuple(video["image_std"]), video_token=str(proc["video_token"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: processor config lacks or garbles {e} (TinyVideoProcessor's keys)") from e
        if int(video["crop_size"]["width"]) != size:
            raise ValueError(f"{path}: TinyVideoProcessor takes square frames, config crops {video['crop_size']}")
        return cls(PreTrainedTokenizerFast.from_pretrained(path), size=size, **kwargs)


def is_tiny_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model this project's trainer wrote: a word-level tokenizer and the processor
    files of ``TinyVideoProcessor.save_pretrained``. Real LLaVA-NeXT-Video checkpoints use subword
    tokenizers, so they never match."""
    path = Path(path)
    tok = path / "tokenizer.json"
    if not (tok.is_file() and (path / "video_preprocessor_config.json").is_file()
            and (path / "processor_config.json").is_file()):
        return False
    try:
        return json.loads(tok.read_text()).get("model", {}).get("type") == "WordLevel"
    except (json.JSONDecodeError, AttributeError):
        return False


_warned_fallback = False


def load_processor(path: str | Path) -> Any:
    """HF's ``LlavaNextVideoProcessor``; ``TinyVideoProcessor`` only for our tiny model where HF's cannot be built.

    HF's video processor needs torchvision (absent from the tested CPU stack and the GPU machine). That
    ImportError is the one case that falls back, with a warning printed once: to ``TinyVideoProcessor``
    for a folder our trainer wrote, to ``TorchLlavaNextVideoProcessor`` (HF's steps in torch, from the
    checkpoint's own configs; a setting it cannot honour is an error) for a real checkpoint. Any other
    failure (a broken config) is a one-line error, never a silently substituted processor.
    """
    global _warned_fallback
    try:
        from transformers import LlavaNextVideoProcessor

        return LlavaNextVideoProcessor.from_pretrained(path)
    except ImportError as e:
        if not is_tiny_model_dir(path):  # a real checkpoint: HF's steps re-done in torch from its own configs
            from adapters.torch_video_processor import TorchLlavaNextVideoProcessor

            proc = TorchLlavaNextVideoProcessor.from_pretrained(path)
            if not _warned_fallback:
                print(f"warning: transformers' LlavaNextVideoProcessor is unavailable ({type(e).__name__}: "
                      "torchvision missing?); using TorchLlavaNextVideoProcessor, HF's resize/crop/normalise "
                      f"steps in torch from {proc.source}", file=sys.stderr, flush=True)
                _warned_fallback = True
            return proc
        if not _warned_fallback:
            print(f"warning: transformers' LlavaNextVideoProcessor is unavailable ({type(e).__name__}: "
                  "torchvision missing?); using the torch-only TinyVideoProcessor for this project's tiny model "
                  "(same preprocessing for its square frames)", file=sys.stderr, flush=True)
            _warned_fallback = True
        return TinyVideoProcessor.from_pretrained(path)
    except Exception as e:  # not swallowed: any other failure becomes one error line naming the folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot load the LLaVA-NeXT-Video processor ({type(e).__name__}: {first})") from e


def processor_frame_size(processor: Any) -> int | None:
    """Square side the frames must be resized to before the processor (the tiny one), else None (HF resizes)."""
    size = getattr(processor, "size", None)
    return size if isinstance(size, int) else None


class LlavaNextVideoAdapter(Adapter):
    family: ClassVar[str] = "llava_next_video"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next_video",)

    def __init__(self, model: PreTrainedModel, processor: Any = None) -> None:
        super().__init__(model)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", dtype: Any = None) -> LlavaNextVideoAdapter:
        """Model + processor (HF's where it can be built, else TinyVideoProcessor: see load_processor)."""
        from transformers import LlavaNextVideoForConditionalGeneration

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
        self, memory: KVMemory, logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
        static: bool = False, compile: bool | str = False,
    ) -> torch.Tensor:
        """Greedy decoding from the prefill's logits; returns (batch, <= max_new_tokens), EOS-padded.
        `static` decodes on a compacting static cache (same tokens), `compile` also compiles its step."""
        if static or compile:
            return self.static_decode(memory, logits, max_new_tokens, eos_token_id, compile)
        embed_tokens = self.language_model.get_input_embeddings()

        def step(token: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                embeds = embed_tokens(token[:, None])  # (batch, 1, hidden)
            return self.prefill(memory, embeds)

        return greedy_decode(logits, step, max_new_tokens, eos_token_id)

    def static_forward(self, cache: StaticKV, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step of `decode` without the feeding: (batch, 1) tokens -> (batch, vocab) logits."""
        embeds = self.language_model.get_input_embeddings()(tokens)  # (batch, 1, hidden)
        hidden = self.language_model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                     use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1]).float()

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

        A prompt holds either one video placeholder (all frames, in order) or one placeholder per frame
        (text such as subtitles interleaved between frames): the frames then go in as one-frame videos,
        which gives the same features because LLaVA-NeXT-Video encodes and pools every frame on its own.
        Returns pixel_values_videos (videos, frames per video, 3, H, W), ids [(1, n_i)] and `split`:
        every prompt's first `split` ids (up to and including the last video token) are identical.
        """
        if self.processor is None:
            raise ValueError("this adapter has no processor; build it with from_pretrained or pass one")
        if not prompts:
            raise ValueError("no questions given")
        proc = self.processor
        n_frames = len(frames)
        n_slots = prompts[0].count(proc.video_token)
        for p in prompts:
            if p.count(proc.video_token) != n_slots or n_slots not in (1, n_frames):
                raise ValueError(f"prompt {p!r} needs exactly one video placeholder ({proc.video_token}) "
                                 f"or one per frame ({n_frames}), the same in every prompt")
        videos = frames if n_slots == 1 else [frames[i : i + 1] for i in range(n_frames)]
        enc = proc(text=prompts[0], videos=videos, return_tensors="pt")
        first = enc["input_ids"]
        n_video = int((first == self.video_token_id).sum()) // n_slots  # video tokens per placeholder
        # The other prompts only need tokens: expand the placeholders as the processor did.
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
