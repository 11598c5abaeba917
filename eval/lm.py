"""Language (source domain): synthetic long-context tasks on a causal LM under every memory policy.

CLI: `namm-transfer eval lm`. Per policy it reports accuracy per task and the kept-cache fraction,
and writes the language row of the result tables. The same `score_policy` is the evolution fitness.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from adapters.llama import CausalLMAdapter
from tasks import synthetic
from transfer.memory import check_update_interval
from transfer.runner import evaluate_policies, parse_policies, process_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LM = ROOT / "artifacts" / "lm" / "tiny-llama-mqar"
# The tasks the shipped LM solves with its full cache (see its PROVENANCE.md); all of them:
# niah_single,niah_multikey,mqar,vt,fwe,passage (any HF causal LM can be evaluated on every task).
DEFAULT_TASKS = "niah_single,vt,fwe"
HELDOUT_SEED = 20261127  # evolution and training use other seeds


def load_lm(model: str | Path, device: str = "cpu") -> tuple[CausalLMAdapter, Any]:
    """Adapter (picked by the registry from config.model_type) + left-padding tokenizer for a causal LM."""
    from transformers import AutoConfig

    from adapters import adapter_for

    if not Path(model).exists() and "/" not in str(model):
        raise FileNotFoundError(f"model {model!r} is neither a local path nor a hub id")
    cls = adapter_for(AutoConfig.from_pretrained(str(model)).model_type)
    if not issubclass(cls, CausalLMAdapter):
        raise ValueError(f"{model}: eval lm needs a causal LM, got a {cls.family} model")
    adapter = cls.from_pretrained(str(model), device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return adapter, tokenizer


def make_examples(tasks: str, n: int, length: int, seed: int) -> list[synthetic.Example]:
    out = []
    for i, task in enumerate(tasks.split(",")):
        out.extend(synthetic.make_examples(task.strip(), n, length, seed=seed + 1000 * i))
    return out


def answer_batch(
    adapter: CausalLMAdapter,
    tokenizer: Any,
    policy_factory: Callable[[], Any],
    batch: list[synthetic.Example],
    update_interval: int,
    chunk_size: int = 512,
) -> list[dict[str, Any]]:
    """Prefill the prompts under one fresh policy, decode greedily, score each answer."""
    enc = tokenizer([ex.prompt for ex in batch], return_tensors="pt", padding=True)
    memory = adapter.new_memory(policy_factory(), update_interval=update_interval)
    max_new = max(len(ex.answer.split()) for ex in batch) + 1
    new = adapter.generate(memory, enc.input_ids, enc.attention_mask, max_new, tokenizer.eos_token_id, chunk_size)
    kept = memory.kept_fraction()
    rows = []
    for i, ex in enumerate(batch):
        prediction = tokenizer.decode(new[i], skip_special_tokens=True)
        rows.append({
            "id": ex.id, "task": ex.task, "prediction": prediction, "answer": ex.answer,
            "score": synthetic.score(ex.task, prediction, ex.answer), "kept_fraction": float(kept[i]),
        })
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per task, their mean, and the mean kept fraction."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append(row["score"])
    task_means = {t: sum(v) / len(v) for t, v in per_task.items()}
    return {
        "score": sum(task_means.values()) / len(task_means),
        "per_task": task_means,
        "kept_fraction": sum(r["kept_fraction"] for r in rows) / len(rows),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_LM), help="HF causal LM id or path (default: the shipped tiny LM)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated synthetic tasks, from: {', '.join(synthetic.TASKS)}")
    p.add_argument("--n", type=int, default=16, help="examples per task")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="example seed (held out from evolution)")
    p.add_argument("--policies", default="full,h2o,l2,namm", help="comma-separated policies, see `policies`")
    p.add_argument("--budget", default="match",
                   help="budgets for budgeted baselines: 'match' (= the NAMM's kept fraction per batch) or "
                        "fractions/tokens, e.g. 0.25,0.5,0.75")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (our dir or reference .pt; default: shipped)")
    p.add_argument("--namm-precision", choices=["fp32", "fast"], default="fp32",
                   help="fp32: the reference's precision; fast: the NAMM's BAM attention in fp16 on CUDA")
    p.add_argument("--update-interval", type=int, default=256, help="tokens between memory updates (multiple of 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/lm", help="run directory root (finished runs are reused)")


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    check_update_interval(args.update_interval)
    start = time.time()
    adapter, tokenizer = load_lm(args.model, process_device(args.device))
    examples = make_examples(args.tasks, args.n, args.length, args.seed)
    specs = parse_policies(args.policies, args.budget)
    config = {
        "domain": "lm", "model": args.model, "tasks": args.tasks, "n": args.n, "length": args.length,
        "seed": args.seed, "update_interval": args.update_interval,
    }
    results = evaluate_policies(
        specs, examples,
        lambda factory, batch: answer_batch(adapter, tokenizer, factory, batch, args.update_interval),
        summarize, Path(args.out) / f"len{args.length}", config, namm=args.namm, batch_size=args.batch_size,
        namm_precision=args.namm_precision,
    )
    from eval.tables import print_domain_table

    print_domain_table("Language (synthetic long-context tasks)", results, time.time() - start)
    return results
