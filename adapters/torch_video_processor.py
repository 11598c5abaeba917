"""A torch-only `LlavaNextVideoProcessor` for real checkpoints where transformers' cannot be built.

transformers' `LlavaNextVideoVideoProcessor` needs torchvision, which neither the tested CPU stack nor
the GPU machine has. This class reads the checkpoint's own files (tokenizer, `processor_config.json`,
`video_preprocessor_config.json`, else `preprocessor_config.json`) and applies the steps that processor
applies, in its order (transformers 5.17-5.23 `BaseVideoProcessor._preprocess`):

1. resize so the shortest edge is `size.shortest_edge` (the long edge `int(S * long / short)`), bicubic
   with antialiasing, as uint8 (float interpolation, clamped and rounded: torchvision's GPU path);
2. center crop to `crop_size` (torchvision's rounding of the offsets);
3. rescale by `rescale_factor` and normalise with `image_mean` / `image_std`.

Each video placeholder becomes (crop_h // patch) * (crop_w // patch) // 4 video tokens per frame, as
`LlavaNextVideoProcessor.replace_video_token` counts them. Any key it does not know how to honour (a
`size` given as height/width, `do_center_crop` off with non-square output, ...) is an error, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.atomic import read_json


def _config(path: Path, names: tuple[str, ...]) -> tuple[dict, Path]:
    for name in names:
        file = path / name
        if file.is_file():
            return read_json(file, "processor config", dict), file
    raise FileNotFoundError(f"{path}: none of {', '.join(names)} found")


def resize_shortest_edge(frames: torch.Tensor, shortest: int) -> torch.Tensor:
    """(F, 3, H, W) uint8 -> shortest edge `shortest`, bicubic antialiased, uint8 (HF's output size rule)."""
    h, w = frames.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest, int(shortest * long / short)
    size = (new_long, new_short) if w <= h else (new_short, new_long)
    if (h, w) == size:
        return frames
    x = torch.nn.functional.interpolate(frames.float(), size=size, mode="bicubic", antialias=True,
                                        align_corners=False)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision `center_crop` for crops inside the frame: offsets int(round((H - h) / 2))."""
    h, w = frames.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"crop {height}x{width} larger than the resized frame {h}x{w}")
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return frames[..., top : top + height, left : left + width]


def encode_video_prompts(processor: Any, text: str | list[str], videos: Any = None) -> dict:
    """What `LlavaNextVideoProcessor(text=..., videos=..., return_tensors="pt")` returns, for any processor with
    `preprocess_video`, `tokens_per_frame`, `video_token` and `tokenizer`: each placeholder becomes
    frames x tokens_per_frame video tokens, the frames become `pixel_values_videos` (videos, F, 3, H, W)."""
    texts = [text] if isinstance(text, str) else list(text)
    vids = [] if videos is None else ([videos] if np.asarray(videos[0]).ndim == 3 else list(videos))
    n_placeholders = sum(t.count(processor.video_token) for t in texts)
    if n_placeholders != len(vids):
        raise ValueError(f"{n_placeholders} {processor.video_token} placeholders but {len(vids)} videos")
    pixel = [processor.preprocess_video(v) for v in vids]
    expanded, k = [], 0
    for t in texts:
        parts = t.split(processor.video_token)
        out = parts[0]
        for p in parts[1:]:
            out += processor.video_token * (pixel[k].shape[0] * processor.tokens_per_frame) + p
            k += 1
        expanded.append(out)
    enc = processor.tokenizer(expanded, return_tensors="pt", padding=len(expanded) > 1)
    result = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if pixel:
        result["pixel_values_videos"] = torch.stack(pixel)  # (videos, F, 3, H, W)
    return result


@dataclass
class TorchLlavaNextVideoProcessor:
    """Callable as `LlavaNextVideoProcessor(text=..., videos=..., return_tensors="pt")` for video inputs."""

    tokenizer: Any
    shortest_edge: int
    crop_size: tuple[int, int]  # (height, width)
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    video_token: str = "<video>"
    source: str = ""  # the config file the settings came from

    @property
    def size(self) -> dict[str, int]:
        """As HF's (a dict): the evaluator must not pre-resize frames to a square for this processor."""
        return {"shortest_edge": self.shortest_edge}

    @property
    def tokens_per_frame(self) -> int:
        return (self.crop_size[0] // self.patch_size) * (self.crop_size[1] // self.patch_size) // 4

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TorchLlavaNextVideoProcessor:
        """Settings from the checkpoint's files; a missing or unsupported setting is an error."""
        from transformers import AutoTokenizer

        path = Path(path)
        proc, _ = _config(path, ("processor_config.json",))
        video, file = _config(path, ("video_preprocessor_config.json", "preprocessor_config.json"))
        try:
            size, crop = video["size"], video["crop_size"]
            if "shortest_edge" not in size:
                raise ValueError(f"size {size} (only shortest_edge is supported)")
            if not (video.get("do_resize", True) and video.get("do_center_crop", True)
                    and video.get("do_rescale", True) and video.get("do_normalize", True)):
                raise ValueError("do_resize/do_center_crop/do_rescale/do_normalize must all be on")
            if int(video.get("resample", 3)) != 3:
                raise ValueError(f"resample {video.get('resample')} (only bicubic, 3, is supported)")
            settings = dict(shortest_edge=int(size["shortest_edge"]), crop_size=(int(crop["height"]),
                            int(crop["width"])), patch_size=int(proc["patch_size"]),
                            image_mean=tuple(float(v) for v in video["image_mean"]),
                            image_std=tuple(float(v) for v in video["image_std"]),
                            rescale_factor=float(video.get("rescale_factor", 1 / 255)),
                            video_token=str(proc.get("video_token", "<video>")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: cannot build the torch-only video processor ({e})") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001  (any tokenizer failure: one line naming the folder)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: cannot load the tokenizer ({first})") from e
        return cls(tokenizer, source=file.name, **settings)

    def preprocess_video(self, frames: Any) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, crop_h, crop_w) float32, normalised."""
        x = torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8
        x = center_crop(resize_shortest_edge(x, self.shortest_edge), *self.crop_size).float()
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (x * self.rescale_factor - mean) / std

    def __call__(self, text: str | list[str], videos: Any = None, return_tensors: str = "pt") -> dict:
        return encode_video_prompts(self, text, videos)

    def batch_decode(self, ids: Any, **kw: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kw)
