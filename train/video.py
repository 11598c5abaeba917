"""Train the tiny LLaVA-NeXT-Video model shipped for video-QA transfer experiments.

A real ``LlavaNextVideoForConditionalGeneration`` (CLIP tower -> 2x2 average pooling -> projector ->
Llama with GQA), only tiny: 112 px frames with 14 px patches give 16 video tokens per frame, so 32
frames are 512 cache tokens and 64 frames 1024. It learns the synthetic long-video QA of
``tasks.synth_video`` from fresh, procedurally rendered videos (no codec needed, so it trains on a bare
GPU box), with codec-like noise so that it also reads the mp4 eval set.

    python -m train.video --out runs/video/tiny --steps 0 --time-budget 240 --device cuda

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
import sys
import time
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
from tasks.synth_video import COLORS, COUNT_OPTIONS, QUESTIONS, SIZE, make_questions, render, sample_spec
from tasks.video_bench import LETTERS, LVB_POST_PROMPT, MLVU_POST_PROMPT, lvb_prompt
from transfer.options import Parser

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
def build_model(tokenizer, vision_hidden: int = 64, text_hidden: int = 128, text_layers: int = 4, seed: int = 0):
    """Tiny LLaVA-NeXT-Video: CLIP 2 layers, Llama ``text_layers`` layers, 4 query heads over 2 KV heads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vocab = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=SIZE, patch_size=PATCH, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=64 * math.ceil(vocab / 64), hidden_size=text_hidden,
                       intermediate_size=3 * text_hidden, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", spatial_pool_mode="average",
        spatial_pool_stride=2, image_grid_pinpoints=[[SIZE, SIZE]], image_seq_length=TOKENS_PER_FRAME * 4,
        video_seq_length=TOKENS_PER_FRAME * 32, tie_word_embeddings=False,
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
    p = Parser(prog="namm-transfer train video",
               description="Train the tiny LLaVA-NeXT-Video model on synthetic video QA.")
    p.add_argument("--out", required=True, help="output dir: model + processor + metrics + PROVENANCE.md")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps; 0 = fit into --max-minutes")
    p.add_argument("--max-minutes", type=float, default=0.0, help="minutes of training (0 = no limit)")
    p.add_argument("--time-budget", type=float, default=None, help=argparse.SUPPRESS)  # the old name, in seconds
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", default="32,64", help="frame counts drawn per batch, comma separated")
    p.add_argument("--stages", default="", help="curriculum qtypes/frames/steps;... (overrides --steps/--frames)")
    p.add_argument("--frame-budget", type=int, default=0,
                   help="frames per batch (videos = budget // frames, constant cost across lengths); 0 = --batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=7, help="training seed (eval set uses tasks/synth_video's 1234)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-dir", default="", help="LongVideoBench-layout held-out set to score at the end")
    p.add_argument("--eval-npz", default="", help="pre-decoded frames of --eval-dir (see decode_frames_npz)")
    p.add_argument("--eval-frames", default="32", help="frame counts for the final eval, comma separated")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint for --resume every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--init", default="", help="start from the weights of a model dir saved by this script")
    args = p.parse_args(argv)
    if args.time_budget is None:  # one name for every time cap: --max-minutes
        args.time_budget = 60 * args.max_minutes
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
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
        for n in [int(x) for x in args.eval_frames.split(",")]:
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


if __name__ == "__main__":
    main()
