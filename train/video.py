"""Train the tiny LLaVA-NeXT-Video model shipped for video-QA transfer experiments.

A real ``LlavaNextVideoForConditionalGeneration`` (CLIP tower -> 2x2 average pooling -> projector ->
Llama with GQA), only tiny: 112 px frames with 14 px patches give 16 video tokens per frame, so 32
frames are 512 cache tokens and 64 frames 1024. It learns the synthetic long-video QA of
``tasks.synth_video`` from fresh, procedurally rendered videos (no codec needed, so it trains on a bare
GPU box), with codec-like noise so that it also reads the mp4 eval set.

    python -m train.video --out runs/video/tiny --steps 0 --time-budget 240 --device cuda

``--task long`` trains the model issue 19 asks for instead: 64-128-frame videos of ``tasks.long_video``
(84 px, 7 px patches: 36 tokens a frame, 2304-4608 video tokens, LM context 8192) whose questions need
the whole video; validation chooses the checkpoint and the test set is scored once, with the full cache
and a 25 % recency cache through the suite's memory (see the section "the long-video task" below and
``train/video_gpu.sh`` for the GPU commands).

The model's runtime (prompt template, ``TinyVideoProcessor``, processor loading) lives in
``adapters/llava_next_video.py``; this module is only the trainer (vocabulary, data, loop, provenance),
a leaf that nothing but the CLI imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapters.llava_next_video import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    PATCH,
    VIDEO_TOKEN,
    TinyVideoProcessor,
    build_prompt,
    build_word_tokenizer,
    processor_frame_size,
)
from tasks import long_video as lv
from tasks.synth_video import COLORS, COUNT_OPTIONS, QUESTIONS, SIZE, make_questions, render, sample_spec
from tasks.video_bench import LETTERS, LVB_POST_PROMPT, MLVU_POST_PROMPT, lvb_prompt
from train.options import video_parser

TOKENS_PER_FRAME = (SIZE // PATCH) ** 2 // 4  # 2x2 average pooling of the patch grid


# --------------------------------------------------------------------------------------------- tokenizer
def _corpus() -> list[str]:
    """Every string the model may see, so the word-level vocabulary has no gaps on our prompts."""
    texts = [build_prompt(""), LVB_POST_PROMPT, MLVU_POST_PROMPT, "(A) (B) (C) (D) (E) N/A", " ".join(LETTERS)]
    texts += [q.format(color=c) for q in QUESTIONS.values() for c in COLORS]
    texts += [lvb_prompt("q ?", COLORS[:5]), lvb_prompt("q ?", COUNT_OPTIONS)]
    texts += [" ".join(COLORS), " ".join(COUNT_OPTIONS), "0 6 7 8 9 10 The best answer is The correct option"]
    return texts


def build_tokenizer():
    """The tiny model's word-level tokenizer: every word of the synthetic task's prompts."""
    return build_word_tokenizer(_corpus())


# ------------------------------------------------------------------------------------------------- model
def build_model(tokenizer, vision_hidden: int = 64, text_hidden: int = 128, text_layers: int = 4, seed: int = 0,
                size: int = SIZE, patch: int = PATCH, max_positions: int = 2048, vision_layers: int = 2,
                heads: int = 4, kv_heads: int = 2):
    """Tiny LLaVA-NeXT-Video: CLIP ``vision_layers`` layers, Llama ``text_layers`` layers, GQA ``heads`` over
    ``kv_heads``; a frame gives ((size // patch) ** 2) / 4 video tokens (2x2 average pooling)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vocab = len(tokenizer)
    tokens_per_frame = (size // patch) ** 2 // 4
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=size,
                              patch_size=patch, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=64 * math.ceil(vocab / 64), hidden_size=text_hidden,
                       intermediate_size=3 * text_hidden, num_hidden_layers=text_layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=max_positions, rope_theta=10000.0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", spatial_pool_mode="average",
        spatial_pool_stride=2, image_grid_pinpoints=[[size, size]], image_seq_length=tokens_per_frame * 4,
        video_seq_length=tokens_per_frame * 32, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                            tokenizer.pad_token_id)
    gen.do_sample = False
    return model


# -------------------------------------------------------------------------------------------------- data
def codec_like(frames: torch.Tensor, gen: torch.Generator | None = None, noise: float = 2.0) -> torch.Tensor:
    """Mimic H.264 yuv420p: halve chroma resolution, add pixel noise. (..., H, W, 3) uint8 -> float."""
    x = frames.float()
    r, g, b = x.unbind(-1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    chroma = torch.stack([b - y, r - y], dim=-3)  # (..., 2, H, W)
    lead = chroma.shape[:-3]
    c = chroma.reshape(-1, 2, *chroma.shape[-2:])
    c = F.interpolate(F.avg_pool2d(c, 2), scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = c.reshape(*lead, 2, *c.shape[-2:]).unbind(-3)
    rgb = torch.stack([y + cr, y - 0.299 / 0.587 * cr - 0.114 / 0.587 * cb, y + cb], dim=-1)
    rgb = rgb + noise * torch.randn(rgb.shape, generator=gen, device=rgb.device)
    return rgb.clamp(0, 255).round()


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) float 0..255 -> (B, F, 3, H, W) CLIP-normalised, as TinyVideoProcessor does."""
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(1, 1, 3, 1, 1)
    return (frames.permute(0, 1, 4, 2, 3) / 255.0 - mean) / std


def sample_batch(rng: np.random.Generator, tokenizer, batch: int, num_frames: int, device,
                 qtypes: tuple[int, ...] = (0, 1, 2, 3)) -> dict:
    """Fresh synthetic videos, one random question each; labels cover only the answer letter + EOS.

    ``qtypes`` indexes ``tasks.synth_video.QUESTION_TYPES`` (first, last, needle, count).
    """
    specs = [sample_spec(rng) for _ in range(batch)]
    idx = [np.linspace(0, s.num_frames - 1, num_frames, dtype=int) for s in specs]
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**31)))
    pixel = normalize(codec_like(render(specs, idx, device=device), gen))
    vid_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    n_vid = num_frames * TOKENS_PER_FRAME
    seqs, labels = [], []
    for s in specs:
        qa = make_questions(s, rng)[int(rng.choice(qtypes))]
        prompt_ids = tokenizer(build_prompt(lvb_prompt(qa["question"], qa["candidates"])))["input_ids"]
        k = prompt_ids.index(vid_id)
        prompt_ids = prompt_ids[:k] + [vid_id] * n_vid + prompt_ids[k + 1:]
        answer = [tokenizer.convert_tokens_to_ids(LETTERS[qa["correct_choice"]]), tokenizer.eos_token_id]
        seqs.append(prompt_ids + answer)
        labels.append([-100] * len(prompt_ids) + answer)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=device)
    return {"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": lab, "pixel_values_videos": pixel}


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_questions(model, processor, example_frames, questions: list[str], device, max_new_tokens: int = 4,
                     prompt_fn=build_prompt) -> list[str]:
    """Full-cache reference: prefill video + prompt for each question, greedy-decode the reply."""
    model.eval()
    replies = []
    for q in questions:
        enc = processor(text=prompt_fn(q), videos=example_frames, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        if "pixel_values_videos" in enc:
            enc["pixel_values_videos"] = enc["pixel_values_videos"].to(model.dtype)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        replies.append(processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return replies


def evaluate_lvb(model, processor, data_dir: str | Path, num_frames: int = 32, device="cpu",
                 frames_npz: str | Path | None = None, seed: int = 0) -> tuple[dict, list[dict]]:
    """Full-cache accuracy on a LongVideoBench-layout set (frames from mp4, or pre-decoded ``.npz``)."""
    from tasks.video_bench import group_by_video, load_longvideobench, lvb_metrics, parse_predictions
    from tasks.video_io import read_frames

    examples = load_longvideobench(data_dir)
    cache = np.load(frames_npz) if frames_npz else None
    ordered, replies = [], []
    for path, exs in group_by_video(examples).items():
        key = f"{Path(path).stem}__{num_frames}"
        frames = cache[key] if cache is not None else read_frames(path, num_frames, size=processor_size(processor))
        replies += answer_questions(model, processor, frames, [e.prompt for e in exs], device)
        ordered += exs
    letters = parse_predictions(ordered, replies, "longvideobench", seed)
    preds = [{"id": e.id, "reply": r, "pred": p, "answer": e.answer_letter, "category": e.groups["question_category"]}
             for e, r, p in zip(ordered, replies, letters)]
    return lvb_metrics(ordered, letters), preds


def processor_size(processor) -> int:
    """Frame side to decode at: the tiny processor's, else the synthetic videos' own size (HF resizes)."""
    return processor_frame_size(processor) or SIZE


def decode_frames_npz(data_dir: str | Path, out: str | Path, frame_counts=(32, 64)) -> Path:
    """Pre-decode a set's mp4s (PyAV) for machines without a video decoder; keys ``<stem>__<frames>``."""
    from tasks.video_bench import load_longvideobench
    from tasks.video_io import read_frames

    arrays = {}
    for ex in load_longvideobench(data_dir):
        for n in frame_counts:
            arrays.setdefault(f"{Path(ex.video_path).stem}__{n}", None)
            if arrays[f"{Path(ex.video_path).stem}__{n}"] is None:
                arrays[f"{Path(ex.video_path).stem}__{n}"] = read_frames(ex.video_path, n, size=SIZE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _init_lines(init: str) -> list[str]:
    path = Path(init) / "train_metrics.json"
    if not path.is_file():
        return [f"- initialised from `{init}` (no train_metrics.json there)"]
    m = json.loads(path.read_text())
    return [f"- initialised from `{init}`, itself made by `{shlex.join(str(x) for x in m['argv'])}`"
            f" (seed {m['args']['seed']}, {m['steps']} steps, {m['train_seconds']} s on {m['device_name']})"]


def write_provenance(out: Path, metrics: dict) -> None:
    """PROVENANCE.md beside the weights: how they were made and what they score."""
    a = metrics["args"]
    lines = [
        "# Tiny LLaVA-NeXT-Video (synthetic long-video QA)", "",
        f"- command: `{shlex.join(str(x) for x in metrics['argv'])}`",
        f"- made: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {metrics['device_name']}"
        f" ({metrics['device']})",
        f"- seed {a['seed']}; {metrics['steps']} optimizer steps in {metrics['train_seconds']} s; "
        + (f"curriculum (qtypes/frames/steps) `{a['stages']}`; " if a.get("stages")
           else f"frames per video {a['frames']}; ")
        + (f"frame budget {a['frame_budget']}" if a["frame_budget"] else f"batch {a['batch']}")
        + f"; AdamW peak lr {a['lr']} (warmup 100, cosine)",
        f"- parameters: {metrics['params']:,}; final EMA train loss {metrics['final_ema_loss']:.4f}, "
        f"teacher-forced letter accuracy {metrics['final_ema_letter_acc']:.3f}",
        "- data: fresh videos from `tasks.synth_video.sample_spec` rendered in-process (numpy seed = training seed),"
        " codec-like chroma subsampling + noise; never the shipped eval set (generator seed 1234)",
        *(_init_lines(a["init"]) if a.get("init") else []),
        "- prompt: `adapters.llava_next_video.build_prompt(lvb_prompt(question, options))`,"
        " target = option letter + `</s>`", "",
        "## Held-out full-cache accuracy (greedy, lmms-eval LongVideoBench parser, chance = 0.20)", "",
        "| frames | overall | " + " | ".join(("first", "last", "needle", "count")) + " | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, m in metrics.items():
        if key.startswith("heldout_"):
            cats = m["by_question_category"]
            lines.append(f"| {key[8:-1]} | {m['acc']:.3f} | "
                         + " | ".join(f"{cats.get(c, float('nan')):.3f}" for c in ("first", "last", "needle", "count"))
                         + f" | {m['n']} |")
    if a.get("eval_dir"):
        lines += ["", f"Eval set: `{a['eval_dir']}`" + (f" (frames from `{a['eval_npz']}`)" if a.get("eval_npz") else
                                                          " (frames decoded from mp4 with PyAV)")]
    (out / "PROVENANCE.md").write_text("\n".join(lines) + "\n")


def parse_stages(text: str) -> list[tuple[tuple[int, ...], list[int], int]]:
    """Curriculum "qtypes/frames/steps;...", e.g. "1/4,8/300;0,1,2,3/8,16,32/900" -> cumulative end steps.

    A tiny model trained on all question types at once sits on the uniform-answer plateau for a long
    time; starting with the easy ``last`` question (type 1) on short clips breaks it.
    """
    stages, end = [], 0
    for part in text.split(";"):
        try:
            q, f, n = part.split("/")
            qtypes = tuple(int(x) for x in q.split(","))
            frames = [int(x) for x in f.split(",")]
            end += int(n)
        except ValueError as e:
            raise ValueError(f"bad --stages part {part!r}: expected qtypes/frames/steps ({e})") from e
        if not set(qtypes) <= {0, 1, 2, 3} or min(frames) < 1:
            raise ValueError(f"bad --stages part {part!r}: qtypes must be in 0-3 and frames positive")
        stages.append((qtypes, frames, end))
    return stages


def stage_at(stages: list, step: int) -> tuple[tuple[int, ...], list[int]]:
    for qtypes, frames, end in stages:
        if step < end:
            return qtypes, frames
    return stages[-1][0], stages[-1][1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = video_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.val_videos = lv.SPLIT_SIZE["val"] if args.val_videos is None else args.val_videos
    args.test_videos = lv.SPLIT_SIZE["test"] if args.test_videos is None else args.test_videos
    if args.time_budget is None:  # one name for every time cap: --max-minutes
        args.time_budget = 60 * args.max_minutes
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.task == "long":
        return main_long(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    stages = parse_stages(args.stages) if args.stages else [((0, 1, 2, 3), [int(x) for x in args.frames.split(",")],
                                                             args.steps)]
    if args.stages:
        args.steps = stages[-1][2]
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = build_tokenizer()
    processor = TinyVideoProcessor(tokenizer, size=SIZE)
    model = build_model(tokenizer, args.vision_hidden, args.text_hidden, args.text_layers, args.seed).to(device)
    if args.init:
        from transformers import LlavaNextVideoForConditionalGeneration

        weights = Path(args.init) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: --init needs a model directory saved by this script")
        model.load_state_dict(LlavaNextVideoForConditionalGeneration.from_pretrained(args.init).state_dict())
        print(f"initialised from {weights}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, total, elapsed_before = 0, args.steps, 0.0
    state_path = out / "train_state.pt"
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, total, elapsed_before = state["step"], state["total"], state["elapsed"]
        rng = np.random.default_rng([args.seed, step])
        print(f"resumed from {state_path} at step {step}/{total}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}, device {device}", flush=True)
    on_gpu = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    t0 = time.time() - elapsed_before
    ema_loss, ema_acc = None, None
    model.train()
    while total == 0 or step < total:
        elapsed = time.time() - t0
        if args.time_budget and elapsed > args.time_budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        if total == 0 and step == 30:  # calibrate the step count to the time budget
            total = max(step + 1, int(args.time_budget / (elapsed / step)))
            print(f"calibrated: {elapsed / step:.3f}s/step -> {total} steps", flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**6, args.lr)
        qtypes, frame_choices = stage_at(stages, step)
        n_frames = int(rng.choice(frame_choices))
        n_videos = max(1, args.frame_budget // n_frames) if args.frame_budget else args.batch
        batch = sample_batch(rng, tokenizer, n_videos, n_frames, device, qtypes)
        with amp:
            outputs = model(**batch)
        loss = outputs.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():  # accuracy of the letter (first label) under teacher forcing
            lab = batch["labels"][:, 1:]
            first = (lab != -100).float().argmax(1)
            pred = outputs.logits[:, :-1].argmax(-1).gather(1, first[:, None])[:, 0]
            acc = (pred == lab.gather(1, first[:, None])[:, 0]).float().mean().item()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        if step % args.log_every == 0 or step == 1:
            print(f"step {step}/{total or '?'} loss {ema_loss:.4f} letter-acc {ema_acc:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s", flush=True)
        if args.save_every and step % args.save_every == 0:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                        "elapsed": time.time() - t0}, tmp)
            os.replace(tmp, state_path)
    train_time = time.time() - t0
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    metrics = {"steps": step, "train_seconds": round(train_time, 1), "final_ema_loss": ema_loss,
               "final_ema_letter_acc": ema_acc, "params": n_params, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "args": vars(args), "argv": ["python", "-m", "train.video", *(sys.argv[1:] if argv is None else argv)]}
    if args.eval_dir:
        for n in [int(x) for x in (args.eval_frames or "32").split(",")]:
            t1 = time.time()
            m, preds = evaluate_lvb(model, processor, args.eval_dir, n, device, args.eval_npz or None)
            m["eval_seconds"] = round(time.time() - t1, 1)
            metrics[f"heldout_{n}f"] = m
            (out / f"predictions_{n}f.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            print(f"held-out ({n} frames): acc {m['acc']:.3f} by type {m['by_question_category']}", flush=True)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    write_provenance(out, metrics)
    if state_path.is_file() and total and step >= total:  # finished: nothing left to resume
        state_path.unlink()
    return metrics


# ================================================================================ the long-video task (issue 19)
# A model that needs its memory: 64-128-frame videos of tasks/long_video.py at 84 px with 7 px patches, so
# 36 tokens a frame and 2304-4608 video tokens (64-128 frames); the LM's context is 8192. Training draws
# fresh videos (numpy, in data-loader processes) and asks all five questions of a video at once: the
# video prefix runs once, its KV cache is repeated for the five questions (exactly what one question
# after the video sees, since the questions never see each other). Validation chooses the model; the
# test set is scored once at the end, with the full cache and a recency cache through the suite's memory.
LONG_PATCH = 7
LONG_TPF = (lv.SIZE // LONG_PATCH) ** 2 // 4  # 36 video tokens a frame
LONG_CONTEXT = 8192
LONG_EVAL_FRAMES = 128
STATE_PART_BYTES = 15 * 2**20  # $OUT takes files up to 16 MiB


def long_corpus() -> list[str]:
    """Every prompt of the long task (all colours, counts and colour pairs) plus the benchmark templates."""
    texts = [build_prompt(""), LVB_POST_PROMPT, MLVU_POST_PROMPT, "(A) (B) (C) (D) (E) N/A", " ".join(LETTERS)]
    for q in lv.QUESTIONS.values():
        texts += [q.format(color=c, a=a, b=b) for c in COLORS for a in COLORS for b in COLORS]
    texts += [lvb_prompt("q ?", list(COLORS)), lvb_prompt("q ?", lv.COUNT_OPTIONS), "The best answer is"]
    return texts


def build_long_tokenizer():
    return build_word_tokenizer(long_corpus())


def build_long_model(tokenizer, args: argparse.Namespace):
    return build_model(tokenizer, args.vision_hidden, args.text_hidden, args.text_layers, args.seed, size=lv.SIZE,
                       patch=LONG_PATCH, max_positions=LONG_CONTEXT, vision_layers=args.vision_layers,
                       heads=args.heads, kv_heads=args.kv_heads)


def parse_curriculum(text: str, total: int) -> list[tuple[list[int], list[int], int]]:
    """"lengths/frames/steps;..." -> [(video lengths, sampled frames, end step)]; the last stage runs to
    `total` (its steps field is ignored). Frames: N > 0 sampled uniformly (lmms-eval rule), 0 every frame,
    -k one k-th of the video's frames (-2 = half: 32 of a 64-frame video, the CPU quick evaluation)."""
    stages, end = [], 0
    parts = [x for x in text.split(";") if x.strip()]
    for i, part in enumerate(parts):
        try:
            lengths_s, frames_s, steps_s = part.split("/")
            lengths = [int(x) for x in lengths_s.split(",")]
            frames = [int(x) for x in frames_s.split(",")]
            end = total if i == len(parts) - 1 else end + int(steps_s)
        except ValueError as e:
            raise ValueError(f"bad --curriculum part {part!r}: expected lengths/frames/steps ({e})") from e
        if min(lengths) < 32 or max(lengths) > 256 or min(frames) < -2:
            raise ValueError(f"bad --curriculum part {part!r}: lengths must be 32-256 frames, frames >= -2")
        stages.append((lengths, frames, end))
    if not stages:
        raise ValueError("--curriculum is empty")
    return stages


def long_stage(stages: list, step: int) -> tuple[list[int], list[int]]:
    for lengths, frames, end in stages:
        if step < end:
            return lengths, frames
    return stages[-1][0], stages[-1][1]


@dataclass
class LongStream(torch.utils.data.Dataset):
    """Training batch `step` as numpy, a pure function of (seed, step): resuming at step s replays exactly.

    One video length and one sampled-frame count per batch (no padding in the video prefix); the number
    of videos is frame_budget // frames (constant cost across stages).
    """

    seed: int
    stages: list
    frame_budget: int
    total: int

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, 1])
        lengths, frames = long_stage(self.stages, step)
        t = int(rng.choice(lengths))
        return long_batch(self.seed, step, t, sampled_frames(int(rng.choice(frames)), t), self.frame_budget)


def sampled_frames(spec: int, length: int) -> int:
    """A curriculum frames entry for a video of `length` frames: N, 0 = all, -k = length // k."""
    return length if spec == 0 else (length // -spec if spec < 0 else spec)


def long_batch(seed: int, step: int, length: int, n_frames: int, frame_budget: int) -> dict:
    """frame_budget // n_frames videos of `length` frames, n_frames sampled from each, all five questions."""
    batch = max(1, frame_budget // n_frames)
    videos = [lv.make_video(lv.train_seed(seed, step, i, batch), length) for i in range(batch)]
    idx = lv.sample_frames(length, n_frames)
    pixels = np.stack([lv.render(v, idx) for v in videos])  # (B, N, S, S, 3) uint8
    questions = [[(q["question"], q["correct_choice"], q["question_category"]) for q in lv.make_questions(v)]
                 for v in videos]
    colors = np.stack([lv.frame_colors(v, idx) for v in videos])  # (B, N) palette index, -1 blank
    return {"step": step, "frames": torch.from_numpy(pixels), "questions": questions,  # tensors: pinned by the loader
            "frame_colors": torch.from_numpy(colors)}


def probe_seconds(model, encoder: LongEncoder, stages: list, frame_budget: int, device, amp) -> list[float]:
    """Seconds a step of each stage takes at its heaviest shape: forward + backward after a warm-up, no
    update (weights and optimizer untouched), so `--steps 0` can fit the schedule into --max-minutes."""
    out = []
    for k, (lengths, frames, _) in enumerate(stages):
        t = max(lengths)
        n = max(sampled_frames(f, t) for f in frames)
        batch = long_batch(0, 10**8 + k, t, n, frame_budget)
        enc = encoder.encode(batch["questions"], n, device)
        times = []
        for _ in range(3):
            t0 = time.time()
            pixel = long_pixels(batch["frames"], device, 0)
            with amp:
                logits = question_logits(model, pixel, enc)
            long_loss(logits, enc)[0].backward()
            model.zero_grad(set_to_none=True)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        out.append(min(times[1:]))
    return out


def fit_steps(stages: list, seconds: list[float], budget_s: float) -> int:
    """Total steps such that the fixed stages plus the last one fill `budget_s` (a 15 % margin for data,
    validation and checkpoints; the probe's heaviest shapes make it conservative on a GPU)."""
    fixed, start = 0.0, 0
    for (_, _, end), sec in zip(stages[:-1], seconds[:-1]):
        fixed += (end - start) * sec
        start = end
    last = int((0.85 * budget_s - fixed) / seconds[-1])
    if last < 100:
        raise ValueError(f"--max-minutes leaves {last} steps for the last stage after the fixed stages "
                         f"({fixed:.0f} s); give more minutes or a shorter curriculum")
    return start + last


def _identity(x):
    return x


class LongEncoder:
    """Prompt ids of the long task, cached: the shared video prefix and each question's own tokens."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.letter_ids = [tokenizer.convert_tokens_to_ids(x) for x in LETTERS]
        # auxiliary targets: index 0 = blank frame ("the"), 1.. = the palette's colour words
        self.color_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in ["the", *COLORS]])
        self.cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def split(self, question: str, options: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """(ids before the video placeholder, ids after it) of build_prompt(lvb_prompt(question, options))."""
        key = (question, options)
        if key not in self.cache:
            ids = self.tok(build_prompt(lvb_prompt(question, list(options))))["input_ids"]
            k = ids.index(self.video_id)
            self.cache[key] = (ids[:k], ids[k + 1:])
        return self.cache[key]

    @staticmethod
    def frame_ends(enc: dict, n_frames: int) -> torch.Tensor:
        """Prefix position of each frame's last video token, (N,)."""
        head = enc["prefix"].shape[1] - n_frames * LONG_TPF
        return head + LONG_TPF * torch.arange(1, n_frames + 1, device=enc["prefix"].device) - 1

    def encode(self, questions: list[list[tuple[str, int, str]]], n_frames: int, device) -> dict:
        """Questions of B videos (Q each) -> prefix (B, P), question ids (B*Q, L) with letter + EOS, targets."""
        seqs, answers = [], []
        head = None
        for qs in questions:
            for text, answer, qtype in qs:
                options = tuple(lv.COUNT_OPTIONS) if qtype == "count" else tuple(COLORS)
                head, tail = self.split(text, options)
                seqs.append(tail + [self.letter_ids[answer], self.tok.eos_token_id])
                answers.append(answer)
        width = max(len(s) for s in seqs)
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        q_ids = torch.tensor([s + [self.tok.pad_token_id] * (width - len(s)) for s in seqs], device=device)
        prefix = torch.tensor(head + [self.video_id] * (n_frames * LONG_TPF), device=device)
        prefix = prefix.expand(len(questions), -1)
        return {"prefix": prefix, "q_ids": q_ids, "lengths": lengths,
                "answers": torch.tensor(answers, device=device), "n_q": len(questions[0])}


def video_embeddings(model, prefix: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Token embeddings of the prefix (B, P) with the video features at the video tokens, (B, P, hidden)."""
    cfg = model.config
    lm = model.model.language_model
    embeds = lm.get_input_embeddings()(prefix)
    feats = model.model.get_video_features(pixel, vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                           return_dict=True).pooler_output
    hidden = embeds.shape[-1]
    feats = torch.cat([f.reshape(-1, hidden) for f in feats]) if isinstance(feats, (list, tuple)) else \
        feats.reshape(-1, hidden)
    mask = (prefix == cfg.video_token_index)[..., None]
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def question_logits(model, pixel: torch.Tensor, enc: dict, frame_ends: torch.Tensor | None = None):
    """Logits over every question's tokens, (B*Q, L, vocab): the video prefix runs once, its cache is
    repeated Q times, and each question (right-padded; padding comes after its answer) attends to it.

    With `frame_ends` (N,) prefix positions, also the logits there, (B, N, vocab), for the auxiliary loss.
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    prefix, q_ids, n_q = enc["prefix"], enc["q_ids"], enc["n_q"]
    out = lm(inputs_embeds=video_embeddings(model, prefix, pixel), use_cache=True)
    frame_logits = None if frame_ends is None else model.lm_head(out.last_hidden_state[:, frame_ends])
    cache = DynamicCache(config=lm.config)
    for i, layer in enumerate(out.past_key_values.layers):  # (B, kv, P, d) -> (B*Q, kv, P, d)
        cache.update(layer.keys.repeat_interleave(n_q, 0), layer.values.repeat_interleave(n_q, 0), i)
    p, width = prefix.shape[1], q_ids.shape[1]
    positions = torch.arange(p, p + width, device=q_ids.device).expand(q_ids.shape[0], -1)
    hidden = lm(inputs_embeds=lm.get_input_embeddings()(q_ids), past_key_values=cache, position_ids=positions,
                use_cache=True).last_hidden_state
    logits = model.lm_head(hidden)
    return logits if frame_ends is None else (logits, frame_logits)


def long_loss(logits: torch.Tensor, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer letter and EOS, and whether the letter is the argmax (B*Q,)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_letter = enc["lengths"] - 3  # the position whose next token is the letter
    letter_logits, eos_logits = logits[rows, at_letter].float(), logits[rows, at_letter + 1].float()
    q_ids = enc["q_ids"]
    loss = (F.cross_entropy(letter_logits, q_ids[rows, at_letter + 1])
            + F.cross_entropy(eos_logits, q_ids[rows, at_letter + 2])) / 2
    return loss, letter_logits.argmax(-1) == q_ids[rows, at_letter + 1]


def long_pixels(frames: np.ndarray | torch.Tensor, device, seed: int | None) -> torch.Tensor:
    """(B, N, S, S, 3) uint8 -> codec-like (seeded) and CLIP-normalised (B, N, 3, S, S) float."""
    x = torch.as_tensor(frames).to(device, non_blocking=True)
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    return normalize(codec_like(x, gen))


@dataclass
class EvalSet:
    videos: list
    frames: np.ndarray  # (V, N, S, S, 3) uint8, codec-like, seeded per video (what an mp4 round trip gives)


def build_eval_set(split: str, n_videos: int, n_frames: int) -> EvalSet:
    """The validation or test videos as `namm-transfer eval video --benchmark synthetic` sees them (the same
    seeds, sampling and per-video codec-like noise: tasks.long_video.eval_frames). The shipped model's run
    (commit d531b64) drew the noise once over the whole stacked set with a torch generator instead."""
    videos = lv.make_split(split, n_videos)
    return EvalSet(videos, np.stack([lv.eval_frames(v, lv.sample_frames(v.num_frames, n_frames)) for v in videos]))


@torch.no_grad()
def evaluate_fast(model, encoder: LongEncoder, es: EvalSet, device, batch: int = 8) -> dict:
    """Full-cache accuracy by the greedy first token (= the letter the decoder would emit), per type."""
    model.eval()
    hits: dict[str, list[bool]] = {q: [] for q in lv.QUESTION_TYPES}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    for i in range(0, len(es.videos), batch):
        vids = es.videos[i:i + batch]
        qs = [[(q["question"], q["correct_choice"], q["question_category"]) for q in lv.make_questions(v)]
              for v in vids]
        enc = encoder.encode(qs, es.frames.shape[1], device)
        with amp:
            logits = question_logits(model, normalize(torch.as_tensor(es.frames[i:i + batch]).to(device).float()), enc)
        _, right = long_loss(logits, enc)
        for (_, _, qtype), ok in zip([q for row in qs for q in row], right.tolist()):
            hits[qtype].append(ok)
    model.train()
    by_type = {q: float(np.mean(h)) for q, h in hits.items()}
    return {"acc": float(np.mean([x for h in hits.values() for x in h])), "by_type": by_type,
            "min_type": min(by_type.values()), "n": sum(len(h) for h in hits.values())}


def final_test(model_dir: Path, es: EvalSet, device, budget: float, update_interval: int = 256) -> dict:
    """The test set, once: full cache vs recency at `budget` through the suite's memory (greedy decoding,
    lmms-eval parser), with a paired bootstrap over videos."""
    from transformers import LlavaNextVideoForConditionalGeneration

    from adapters.llava_next_video import LlavaNextVideoAdapter
    from tasks.video_bench import parse_predictions
    from transfer.policies import make_policy
    from transfer.stats import PairedBootstrap, verdict

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device)
    adapter = LlavaNextVideoAdapter(model, TinyVideoProcessor.from_pretrained(model_dir))
    policies = {"full": lambda: make_policy("full"),
                f"recency@{budget}": lambda: make_policy("recency", budget=budget, protect_recent=32)}
    units: dict[str, list] = {}
    result: dict = {"n_videos": len(es.videos), "frames": int(es.frames.shape[1]), "update_interval": update_interval,
                    "protect_recent": 32, "chance": 1 / lv.N_OPTIONS, "majority_letter": 1 / lv.N_OPTIONS}
    for label, factory in policies.items():
        t0 = time.time()
        rows, kept = [], []
        for video, frames in zip(es.videos, es.frames):
            records = lv.lvb_records(video)
            prompts = [lvb_prompt(r["question"], r["candidates"]) for r in records]
            memory = adapter.new_memory(factory(), update_interval=update_interval)
            replies, k = adapter.answer_many(memory, frames, prompts, max_new_tokens=4)
            kept += k
            exs = [_Example(r["id"], LETTERS[r["correct_choice"]], r["candidates"]) for r in records]
            letters = parse_predictions(exs, replies, "longvideobench", 0)
            rows += [(r, letter, reply) for r, letter, reply in zip(records, letters, replies)]
        correct = [letter == LETTERS[r["correct_choice"]] for r, letter, _ in rows]
        by_type = {q: float(np.mean([c for (r, _, _), c in zip(rows, correct) if r["question_category"] == q]))
                   for q in lv.QUESTION_TYPES}
        result[label] = {"acc": float(np.mean(correct)), "by_type": by_type, "min_type": min(by_type.values()),
                         "kept_fraction": float(np.mean(kept)), "seconds": round(time.time() - t0, 1),
                         "predicted_letters": {x: sum(letter == x for _, letter, _ in rows) for x in LETTERS}}
        units[label] = [("", r["video_id"], r["id"], float(c)) for (r, _, _), c in zip(rows, correct)]
        print(f"test {label}: acc {result[label]['acc']:.3f} by type {by_type} kept "
              f"{result[label]['kept_fraction']:.3f} ({result[label]['seconds']} s)", flush=True)
    table = PairedBootstrap(units)
    full, rec = list(policies)
    delta = table.diff(full, rec)
    result["full_minus_recency"] = {"delta": delta[0], "ci95": [delta[1], delta[2]], "verdict": verdict(delta),
                                    "n_units": table.n_units, "full_ci95": list(table.ci(full)),
                                    "recency_ci95": list(table.ci(rec))}
    print(f"test full - {rec}: {delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}] ({verdict(delta)}, "
          f"{table.n_units} videos)", flush=True)
    return result


@dataclass
class _Example:
    """What tasks.video_bench.parse_predictions reads of an example."""

    id: str
    answer_letter: str
    options: list


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(out: Path, resume_from: str, device) -> dict | None:
    """<out>/train_state.pt, else the file or its .partNN pieces in `resume_from` (as --export wrote them)."""
    path = out / "train_state.pt"
    if not path.is_file() and resume_from:
        src = Path(resume_from)
        parts = sorted(src.glob("train_state.pt.part*"))
        if (src / "train_state.pt").is_file():
            path = src / "train_state.pt"
        elif parts:
            with open(out / "train_state.pt.tmp", "wb") as f:
                for part in parts:
                    f.write(part.read_bytes())
            os.replace(out / "train_state.pt.tmp", path)
        else:
            raise FileNotFoundError(f"{src}: no train_state.pt or train_state.pt.part* to resume from")
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def export(out: Path, dest: str) -> None:
    """At most 8 files of at most 15 MiB for $OUT: model.tar.gz, train_state.pt.partNN, log, metrics."""
    import tarfile

    dest_dir = Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if (out / "model").is_dir():
        with tarfile.open(dest_dir / "model.tar.gz", "w:gz") as tar:
            tar.add(out / "model", arcname="model")
    state = out / "train_state.pt"
    if state.is_file():
        data = state.read_bytes()
        for i in range(0, len(data), STATE_PART_BYTES):
            (dest_dir / f"train_state.pt.part{i // STATE_PART_BYTES:02d}").write_bytes(data[i:i + STATE_PART_BYTES])
    for name in ("train_log.jsonl", "train_metrics.json"):
        if (out / name).is_file():
            shutil.copy(out / name, dest_dir / name)
    files = list(dest_dir.iterdir())
    if len(files) > 8 or any(f.stat().st_size > 16 * 2**20 for f in files):
        raise RuntimeError(f"{dest_dir}: export breaks $OUT's limits (8 files, 16 MiB each)")


def main_long(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Train on the long-video stream, select on validation, score the test set once (see the section note)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = build_long_tokenizer()
    processor = TinyVideoProcessor(tokenizer, size=lv.SIZE, patch_size=LONG_PATCH)
    encoder = LongEncoder(tokenizer)
    eval_frames = int(args.eval_frames) if args.eval_frames else LONG_EVAL_FRAMES
    argv_list = ["python", "-m", "train.video", *(sys.argv[1:] if argv is None else argv)]
    log_path = out / "train_log.jsonl"

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if args.eval_only:
        return finish_long(out, args, argv_list, device, eval_frames, None)
    model = build_long_model(tokenizer, args).to(device)
    if args.init:
        from transformers import LlavaNextVideoForConditionalGeneration

        model.load_state_dict(LlavaNextVideoForConditionalGeneration.from_pretrained(args.init).state_dict())
        print(f"initialised from {args.init}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, elapsed_before, best, ema = 0, 0.0, {"acc": -1.0, "step": -1}, {}
    state = load_state(out, args.resume_from, device) if (args.resume or args.resume_from) else None
    if (args.resume or args.resume_from) and state is None:
        raise FileNotFoundError(f"{out / 'train_state.pt'}: nothing to resume (give --resume-from DIR)")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before, best, ema = state["step"], state["elapsed"], state["best"], state["ema"]
        if args.steps not in (0, state["steps"]):
            raise ValueError(f"the checkpoint is of a {state['steps']}-step run, not --steps {args.steps}")
        args.steps = state["steps"]
        print(f"resumed at step {step}/{args.steps}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}, {LONG_TPF} tokens/frame, "
          f"context {LONG_CONTEXT}, device {device}", flush=True)
    on_gpu = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    budget = args.frame_budget or 2048
    if args.steps <= 0:  # fit the schedule into --max-minutes, once; a resumed run keeps its step count
        if not args.time_budget:
            raise ValueError("--task long needs --steps N, or --steps 0 with --max-minutes")
        probe_stages = parse_curriculum(args.curriculum, 10**9)
        seconds = probe_seconds(model, encoder, probe_stages, budget, device, amp)
        args.steps = fit_steps(probe_stages, seconds, args.time_budget)
        print(f"probe: {' / '.join(f'{x * 1000:.0f}' for x in seconds)} ms a step per stage -> {args.steps} steps "
              f"in {args.time_budget / 60:.1f} min", flush=True)
    stages = parse_curriculum(args.curriculum, args.steps)
    val = build_eval_set("val", args.val_videos, eval_frames)
    loader = torch.utils.data.DataLoader(
        LongStream(args.seed, stages, budget, args.steps), batch_size=None, sampler=range(step, args.steps),
        num_workers=args.workers, collate_fn=_identity, pin_memory=on_gpu,
        prefetch_factor=4 if args.workers else None, persistent_workers=False)
    t_start = time.time()

    def checkpoint() -> None:
        save_state(out / "train_state.pt", {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                            "steps": args.steps, "elapsed": elapsed_before + time.time() - t_start,
                                            "best": best, "ema": ema})

    def validate() -> None:
        m = evaluate_fast(model, encoder, val, device)
        score = m["acc"] + m["min_type"]  # overall and the weakest type both count (the targets do)
        better = score > best["acc"]
        print(f"val step {step}: acc {m['acc']:.3f} min-type {m['min_type']:.3f} {m['by_type']}"
              f"{' (best so far)' if better else ''}", flush=True)
        log({"step": step, "val": m})
        if better:
            best.update(acc=score, step=step, val=m)
            model.save_pretrained(out / "model", safe_serialization=True)
            processor.save_pretrained(out / "model")

    model.train()
    stopped = False
    for batch in loader:
        assert batch["step"] == step, (batch["step"], step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        frames = torch.as_tensor(batch["frames"])
        enc = encoder.encode(batch["questions"], frames.shape[1], device)
        pixel = long_pixels(frames, device, args.seed * 10**7 + step)
        with amp:
            if args.aux_weight:
                logits, frame_logits = question_logits(model, pixel, enc, encoder.frame_ends(enc, frames.shape[1]))
            else:
                logits = question_logits(model, pixel, enc)
        loss, right = long_loss(logits, enc)
        answer_loss, aux = loss.item(), 0.0
        if args.aux_weight:  # each frame's last token names the colour on screen (or "the" when blank)
            target = encoder.color_ids.to(device)[batch["frame_colors"].to(device) + 1]  # (B, N)
            aux_loss = F.cross_entropy(frame_logits.float().flatten(0, 1), target.flatten())
            loss, aux = loss + args.aux_weight * aux_loss, aux_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        qtypes = [q for row in batch["questions"] for _, _, q in row]
        acc = {q: float(np.mean([r for r, t in zip(right.tolist(), qtypes) if t == q])) for q in lv.QUESTION_TYPES}
        for key, value in [("loss", answer_loss), ("aux", aux), *acc.items()]:
            ema[key] = value if key not in ema else 0.98 * ema[key] + 0.02 * value
        if step % args.log_every == 0 or step == 1:
            secs = elapsed_before + time.time() - t_start
            print(f"step {step}/{args.steps} frames {frames.shape[1]}x{frames.shape[0]} loss {ema['loss']:.4f} "
                  f"aux {ema['aux']:.3f} "
                  + " ".join(f"{q} {ema[q]:.2f}" for q in lv.QUESTION_TYPES)
                  + f" lr {opt.param_groups[0]['lr']:.2e} {secs:.0f}s", flush=True)
            log({"step": step, "seconds": round(secs, 1), "frames": int(frames.shape[1]), "batch_loss": answer_loss,
                 **ema})
        if step % args.eval_every == 0 or step == args.steps:
            validate()
        if args.save_every and step % args.save_every == 0:
            checkpoint()
        if args.time_budget and time.time() - t_start > args.time_budget and step < args.steps:
            stopped = True
            print(f"--max-minutes reached at step {step}", flush=True)
            break
    if stopped or step < args.steps:
        checkpoint()
        result = {"steps": step, "finished": False, "best": best, "params": n_params}
        if args.export:
            export(out, args.export)
        return result
    checkpoint()
    return finish_long(out, args, argv_list, device, eval_frames,
                       {"train_seconds": round(elapsed_before + time.time() - t_start, 1), "params": n_params,
                        "best": best, "final_ema": ema})


def finish_long(out: Path, args: argparse.Namespace, argv_list: list[str], device, eval_frames: int,
                train: dict | None) -> dict:
    """The one test evaluation of the validation-chosen model in <out>/model; metrics + PROVENANCE beside it."""
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir}: no model chosen on validation yet")
    if train is None:  # --eval-only: what training recorded
        old = out / "train_metrics.json"
        train = json.loads(old.read_text())["train"] if old.is_file() else {}
    test = final_test(model_dir, build_eval_set("test", args.test_videos, eval_frames), device, args.recency_budget)
    metrics = {"task": "long", "train": train, "test": test, "eval_frames": eval_frames,
               "tokens_per_frame": LONG_TPF, "context": LONG_CONTEXT, "args": vars(args), "argv": argv_list,
               "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    text = json.dumps(metrics, indent=2, default=str) + "\n"
    (out / "train_metrics.json").write_text(text)
    (model_dir / "train_metrics.json").write_text(text)
    write_long_provenance(model_dir, metrics)
    if args.export:
        export(out, args.export)
    return metrics


def write_long_provenance(model_dir: Path, m: dict) -> None:
    """PROVENANCE.md beside the chosen weights: data, split, command, selection and the one test result."""
    a, t, test = m["args"], m["train"], m["test"]
    full, rec = test["full"], test[f"recency@{a['recency_budget']}"]
    d = test["full_minus_recency"]
    types = lv.QUESTION_TYPES
    lines = [
        "# Tiny LLaVA-NeXT-Video for the long-video task (tasks/long_video.py)", "",
        f"- command: `{shlex.join(str(x) for x in m['argv'])}`",
        f"- made: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['device_name']}",
        f"- {t.get('params', 0):,} parameters; {LONG_TPF} video tokens a frame (84 px, 7 px patches, 2x2 pooling),"
        f" LM context {LONG_CONTEXT}; {a['steps']} steps, {t.get('train_seconds', '?')} s; curriculum "
        f"`{a['curriculum']}`; frame budget {a['frame_budget'] or 2048}; AdamW peak lr {a['lr']} "
        f"(warmup {a['warmup']}, cosine); seed {a['seed']}",
        "- data: fresh training videos drawn on the fly (video seeds in [0, 1e12)), codec-like noise; "
        f"validation: {a['val_videos']} videos (seeds from 1e12) chose the checkpoint (best overall + weakest type, "
        f"step {t.get('best', {}).get('step')}); test: {a['test_videos']} videos (seeds from 2e12), scored once, below",
        f"- evaluation: {m['eval_frames']} frames a video (lmms-eval sampling), {m['eval_frames'] * LONG_TPF} video "
        "tokens; greedy decoding through the suite's memory, lmms-eval LongVideoBench parser; letters balanced "
        "per type, so chance and always-one-letter are 0.20", "",
        "| cache | overall | " + " | ".join(types) + " | kept |", "|---" * (len(types) + 3) + "|",
    ]
    for label, r in (("full", full), (f"recency {a['recency_budget']:.0%} (protect 32)", rec)):
        lines.append(f"| {label} | {r['acc']:.3f} | " + " | ".join(f"{r['by_type'][q]:.3f}" for q in types)
                     + f" | {r['kept_fraction']:.3f} |")
    lines += ["", f"Full minus recency: {d['delta']:+.3f}, 95 % CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
              f"(paired bootstrap over {d['n_units']} videos): {d['verdict']}."]
    (model_dir / "PROVENANCE.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
