"""Train the small source LM: a random-init Llama (GQA, RoPE) on the dense synthetic task mixture.

Why this recipe (measured on our H200 runs, see artifacts/lm/*/PROVENANCE.md): one query per sequence
stays at chance for minutes, so every training sequence carries many questions and the loss is on every
answer word (dense supervision, as in Zoology's MQAR); the length curriculum lengthens only once answer
accuracy is high; the `copy` induction format joins the mix (a 7-minute run without it never learned
key-matched lookup, one with it did within ~1,000 steps; not an ablation); warmup + cosine, bf16
autocast, large token batches, the LM head only on answer positions.

    python -m train.lm --out runs/lm --train-minutes 7 --resume      # one process
    torchrun --nproc-per-node 2 -m train.lm ...        # data-parallel (DDP over NCCL), one process a GPU
    bash train/source_lm_gpu.sh phase1 8.6             # the exact recipe of artifacts/lm/llama-8k-recall

Checkpoints (model fp32, optimiser moments bf16, state json) go to --ckpt-dir every --ckpt-every
steps; --resume continues from them; --init-from starts from saved weights with a fresh optimiser (for a
checkpoint that had to travel as bf16 weights). The LR schedule follows progress = max(step/steps,
trained_seconds/train_seconds), so a run can be bounded by wall time and still anneal.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.synthetic import (
    EOS,
    TASKS,
    TRAIN_ONLY_TASKS,
    VOCAB,
    WORD_TO_ID,
    build_tokenizer,
    make_examples,
    make_training_sequence,
    score,
)
from train.options import lm_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = lm_parser()
    args = p.parse_args(argv)
    bad = [t for t in args.tasks if t not in TASKS and t not in TRAIN_ONLY_TASKS]
    if bad:
        p.error(f"unknown task(s) {bad}; choose from {sorted(TASKS) + list(TRAIN_ONLY_TASKS)}")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        p.error("--heads must divide --hidden and be a multiple of --kv-heads")
    if min(args.lengths) < 128 or any(b < a for a, b in zip(args.lengths, args.lengths[1:])):
        p.error("--lengths must be increasing and >= 128")
    if args.state_from and not args.init_from:
        p.error("--state-from needs --init-from")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rope_theta=args.rope_theta, tie_word_embeddings=True,
        bos_token_id=WORD_TO_ID["<s>"], eos_token_id=WORD_TO_ID[EOS], pad_token_id=WORD_TO_ID["<pad>"],
        initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


class AnswerLoss(torch.nn.Module):
    """Cross-entropy on answer positions only; the LM head runs on those rows alone (saves the full logits).

    Wrapping this module (not the LM) in DDP keeps gradient sync on the path the loss takes.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # ids, mask: (batch, length + 1); position t of the hidden states predicts token t + 1
        hidden = self.lm.model(input_ids=ids[:, :-1]).last_hidden_state  # (batch, length, d)
        m = mask[:, 1:]
        logits = self.lm.lm_head(hidden[m]).float()  # (n_answer, vocab)
        tgt = ids[:, 1:][m]
        loss = F.cross_entropy(logits, tgt)
        rows = m.nonzero()[:, 0]  # (n_answer,) batch row of each answer token
        return loss, logits.argmax(-1) == tgt, rows


# ----------------------------------------------------------------------------- data


def make_batch(tasks: list[str], length: int, batch: int, rng: np.random.Generator):
    """(ids (batch, length+1), target mask (batch, length+1), task index per row)."""
    which = rng.integers(len(tasks), size=batch)
    rows = [make_training_sequence(tasks[t], length, rng) for t in which]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]))
    return ids, mask, torch.from_numpy(which)


class _CurriculumStream(torch.utils.data.IterableDataset):
    """Endless batches at the current curriculum stage, read from a value shared with the trainer.

    Each batch is at the stage's length or, with probability `replay`, at an earlier stage's; workers
    see a stage change a few prefetched batches late, which is harmless. Yields (ids, mask, which, length).
    """

    def __init__(self, tasks, lengths, batch_tokens, replay, seed, stage):
        self.tasks, self.lengths, self.batch_tokens = tasks, lengths, batch_tokens
        self.replay, self.seed, self.stage = replay, seed, stage

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([*self.seed, info.id if info else 0])
        while True:
            stage = self.stage.value
            L = self.lengths[stage]
            if stage > 0 and rng.random() < self.replay:
                L = self.lengths[int(rng.integers(stage))]
            yield (*make_batch(self.tasks, L, max(1, self.batch_tokens // L), rng), L)


def _stream(args, seed: list[int], stage):
    ds = _CurriculumStream(args.tasks, args.lengths, args.batch_tokens, args.replay, seed, stage)
    if args.workers > 0:
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                                persistent_workers=True, multiprocessing_context="fork"))
    return iter(ds)


# ----------------------------------------------------------------------------- generation / eval


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None) -> torch.Tensor:
    """Greedy full-cache decoding for a batch of equal-length prompts; returns (batch, new) ids."""
    out = model(input_ids=input_ids, use_cache=True)
    past, new = out.past_key_values, []
    nxt = out.logits[:, -1].argmax(-1)  # (batch,)
    done = torch.zeros_like(nxt, dtype=torch.bool)
    for _ in range(max_new_tokens):
        new.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
    return torch.stack(new, 1)


def generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    """Plain full-cache greedy reference: the text the model writes after `prompt`, up to EOS."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    new = generate_ids(model, ids, max_new_tokens, tokenizer.eos_token_id)[0].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def evaluate_full_cache(model, tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int = 1234,
                        batch: int = 16, max_new_tokens: int = 8) -> dict:
    """Mean score and chance per task and length with greedy full-cache decoding (training-only formats skipped)."""
    model.eval()
    device = next(model.parameters()).device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    res: dict = {}
    for task in [t for t in tasks if t in TASKS]:
        res[task] = {}
        for L in lengths:
            exs = make_examples(task, n, L, seed=seed)
            scores = []
            for i in range(0, n, batch):
                chunk = exs[i:i + batch]
                ids = tokenizer([e.prompt for e in chunk], return_tensors="pt")["input_ids"].to(device)
                with amp:
                    new = generate_ids(model, ids, max_new_tokens, tokenizer.eos_token_id)
                for e, row in zip(chunk, new.tolist()):
                    scores.append(score(task, tokenizer.decode(row, skip_special_tokens=False), e.answer))
            res[task][str(L)] = {"score": float(np.mean(scores)), "chance": float(np.mean([e.chance for e in exs])),
                                 "n": n}
    model.train()
    return res


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, model, opt, state: dict) -> None:
    """Model in fp32, Adam moments in bf16 (keeps each file small enough to ship back from the device)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, ckpt_dir / "model.pt")
    osd = opt.state_dict()
    osd["state"] = {k: {n: (t.to(torch.bfloat16).cpu() if t.dim() > 0 else t.cpu()) for n, t in s.items()}
                    for k, s in osd["state"].items()}
    _atomic_save(osd, ckpt_dir / "optim.pt")
    tmp = ckpt_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, ckpt_dir / "state.json")


def load_checkpoint(ckpt_dir: Path, model, opt) -> dict:
    state = json.loads((ckpt_dir / "state.json").read_text())
    model.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location="cpu"))
    osd = torch.load(ckpt_dir / "optim.pt", map_location="cpu")
    osd["state"] = {k: {n: t.float() for n, t in s.items()} for k, s in osd["state"].items()}
    opt.load_state_dict(osd)
    return state


def load_weights(model, source: str | Path) -> None:
    """Weights from an HF model dir (safetensors, any dtype) or a model.pt state dict, cast to the model's dtype."""
    source = Path(source)
    if source.is_dir():
        from safetensors.torch import load_file

        sd = load_file(str(source / "model.safetensors"))
    else:
        sd = torch.load(source, map_location="cpu")
    sd = {k: v.float() for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied embeddings: safetensors stores embed_tokens only
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"{source}: missing {missing}, unexpected {unexpected}")


def save_final(model, out: Path, dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    model.float()
    build_tokenizer().save_pretrained(out)


# ----------------------------------------------------------------------------- training


def lr_at(args, step: int, trained_s: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    prog = step / max(1, args.steps)
    if args.train_minutes > 0:
        prog = max(prog, trained_s / (60 * args.train_minutes))
    prog = min(1.0, prog)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def _dist_setup(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun's env vars switch on DDP (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(args.device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = _dist_setup(args)
    lead = rank == 0
    out = Path(args.out)
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else out / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same init on every rank
    model = build_model(args)
    state = {"step": 0, "stage": 0, "stage_steps": 0, "ema_acc": 0.0, "trained_s": 0.0, "invocations": 0}
    if args.init_from:
        load_weights(model, args.init_from)
        if args.state_from:
            state = json.loads(Path(args.state_from).read_text())
        if lead:
            print(f"initialised from {args.init_from} (fresh optimiser), step {state['step']}")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    if args.resume and (ckpt_dir / "state.json").exists():
        state = load_checkpoint(ckpt_dir, model, opt)
        model.to(device)
        if lead:
            print(f"resumed from {ckpt_dir} at step {state['step']} (stage {state['stage']})")
    state["invocations"] += 1
    warm0 = state["step"] if args.init_from and not args.resume else 0  # fresh moments: warm up again
    if lead:
        print(f"model: {n_params / 1e6:.2f} M params, {args.layers} layers, hidden {args.hidden}, "
              f"{args.heads} q heads / {args.kv_heads} kv heads, device {device}, {world} process(es)")
    net = AnswerLoss(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    shared_stage = mp.get_context("fork").Value("i", state["stage"])
    stream = _stream(args, [args.seed, state["invocations"], rank], shared_stage)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    log_f = open(out / "train_log.jsonl", "a") if lead else None
    t_start = time.time()
    t_last = time.time()
    tok_seen = 0
    stats: dict = {}
    model.train()
    while state["step"] < args.steps:
        stop = bool(args.stop_minutes and time.time() - t_start > 60 * args.stop_minutes)
        stop |= bool(args.train_minutes and state["trained_s"] >= 60 * args.train_minutes)
        ids, mask, which, L = next(stream)
        L = int(L)
        ids, mask, which = ids.to(device, non_blocking=True), mask.to(device), which.to(device)
        lr = lr_at(args, state["step"], state["trained_s"])
        if warm0:  # fresh Adam moments on trained weights: ramp the scheduled LR up again
            lr *= min(1.0, (state["step"] - warm0 + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp:
            loss, correct, rows = net(ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():  # answer-token accuracy per task (macro over the tasks in this batch)
            per_row = torch.zeros(ids.shape[0], device=device).index_add_(0, rows, correct.float())
            per_row = per_row / torch.bincount(rows, minlength=ids.shape[0]).clamp(min=1)
            accs = {args.tasks[t]: per_row[which == t].mean().item() for t in which.unique().tolist()}
        macro = float(np.mean(list(accs.values())))
        at_stage = L == args.lengths[state["stage"]]
        now = time.time()
        # one small all-reduce keeps every rank's curriculum, clock (-> LR) and stop decision identical
        sync = torch.tensor([macro * at_stage, float(at_stage), float(stop), now - t_last], dtype=torch.float64,
                            device=device)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sync)
        t_last = now
        acc_sum, acc_n, stop_any, dt = sync.tolist()
        if acc_n:
            acc = acc_sum / acc_n
            state["ema_acc"] = 0.95 * state["ema_acc"] + 0.05 * acc if state["stage_steps"] else acc
            state["stage_steps"] += 1
        for t, a in accs.items():
            s = stats.setdefault((t, L), [0.0, 0])
            s[0] += a
            s[1] += 1
        tok_seen += ids.numel() * world
        state["step"] += 1
        state["trained_s"] += dt / world
        stage = state["stage"]
        if (stage + 1 < len(args.lengths) and state["stage_steps"] >= args.min_stage_steps
                and (state["ema_acc"] >= args.advance_acc or state["stage_steps"] >= args.max_stage_steps)):
            if lead:
                print(f"step {state['step']}: length {args.lengths[stage]} -> {args.lengths[stage + 1]} "
                      f"(ema answer acc {state['ema_acc']:.3f})", flush=True)
            state["stage"] += 1
            state["stage_steps"] = 0
            state["ema_acc"] = 0.0
            shared_stage.value = state["stage"]
        if lead and (state["step"] % args.log_every == 0 or state["step"] == 1):
            el = time.time() - t_start
            per = {f"{t}@{Lx}": round(s[0] / s[1], 3) for (t, Lx), s in sorted(stats.items())}
            rec = {"step": state["step"], "stage_len": args.lengths[state["stage"]], "loss": round(loss.item(), 4),
                   "ema_acc": round(state["ema_acc"], 3), "lr": lr, "tok_per_s": round(tok_seen / max(el, 1e-9)),
                   "elapsed_s": round(el, 1), "trained_s": round(state["trained_s"], 1), "acc": per}
            print(json.dumps(rec), flush=True)
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            stats = {}
        if lead and state["step"] % args.ckpt_every == 0:
            save_checkpoint(ckpt_dir, model, opt, state)
        if stop_any:
            if lead:
                print(f"stopping at step {state['step']} (stop-minutes / train-minutes reached)")
            break
    if lead:
        save_checkpoint(ckpt_dir, model, opt, state)
        log_f.close()
    result = {"step": state["step"], "trained_s": state["trained_s"], "params": n_params,
              "final_stage_len": args.lengths[state["stage"]]}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if not lead:
            return result
    tok = build_tokenizer()
    if args.eval_lengths and args.eval_n > 0:
        t0 = time.time()
        result["eval"] = evaluate_full_cache(model, tok, args.tasks, args.eval_lengths, args.eval_n, args.eval_seed)
        result["eval_s"] = time.time() - t0
        for task, per in result["eval"].items():
            print(task, {L: f"{v['score']:.3f} (chance {v['chance']:.3f})" for L, v in per.items()})
        tmp = out / "eval_full_cache.json.tmp"
        tmp.write_text(json.dumps({"args": vars(args), **result}, indent=1))
        os.replace(tmp, out / "eval_full_cache.json")
    save_final(model, out, args.save_dtype)
    return result


if __name__ == "__main__":
    main()
