"""Language tasks as the evaluators and the NAMM's evolution run them: load an LM, build examples, answer.

`answer_batch` is the one definition of "how a batch of prompts is answered under a memory policy":
the evaluation (`eval/lm.py`) and the evolution fitness (`train/evolve.py`) both call it, so what
evolution optimises is exactly what the tables report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.llama import CausalLMAdapter
from tasks import synthetic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LM = ROOT / "artifacts" / "lm" / "tiny-llama-mqar"


def load_lm(model: str | Path, device: str = "cpu") -> tuple[CausalLMAdapter, Any]:
    """Adapter (picked by the registry from config.model_type) + left-padding tokenizer for a causal LM."""
    from transformers import AutoConfig, AutoTokenizer

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
    """n examples of each comma-separated task at `length` tokens; task i uses seed + 1000 i."""
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
    """Prefill the prompts under one fresh policy, decode greedily, score each answer (stratum = task)."""
    enc = tokenizer([ex.prompt for ex in batch], return_tensors="pt", padding=True)
    memory = adapter.new_memory(policy_factory(), update_interval=update_interval)
    max_new = max(len(ex.answer.split()) for ex in batch) + 1
    new = adapter.generate(memory, enc.input_ids, enc.attention_mask, max_new, tokenizer.eos_token_id, chunk_size)
    kept = memory.kept_fraction()
    rows = []
    for i, ex in enumerate(batch):
        prediction = tokenizer.decode(new[i], skip_special_tokens=True)
        rows.append({
            "id": ex.id, "task": ex.task, "stratum": ex.task, "prediction": prediction, "answer": ex.answer,
            "score": synthetic.score(ex.task, prediction, ex.answer), "kept_fraction": float(kept[i]),
        })
    return rows
