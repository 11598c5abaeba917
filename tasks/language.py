"""Language tasks as the evaluators and the NAMM's evolution run them: load an LM, build examples, answer.

`answer_batch` is the one definition of "how a batch of prompts is answered under a memory policy":
the evaluation (`eval/lm.py`) and the evolution fitness (`train/evolve.py`) both call it, so what
evolution optimises is exactly what the tables report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import longbench, synthetic

if TYPE_CHECKING:
    from adapters.causal_lm import CausalLMAdapter

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LM = ROOT / "artifacts" / "lm" / "tiny-llama-mqar"


def load_lm(model: str | Path, device: str = "cpu") -> tuple[CausalLMAdapter, Any]:
    """Adapter (picked by the registry from config.model_type) + left-padding tokenizer for a causal LM."""
    from transformers import AutoConfig, AutoTokenizer

    from adapters import adapter_for
    from adapters.causal_lm import CausalLMAdapter  # here, not at import: `--help` must not load torch

    text = str(model)
    if not Path(text).exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise FileNotFoundError(f"model {text}: no such directory (a hub id has the form name or owner/name)")
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


def context_limit(model_config: Any) -> int | None:
    """Tokens (prompt + answer) the model takes, as the NAMM reference infers it (evo-memory
    `memory_evaluator.py`): max_position_embeddings, times the RoPE scaling factor for static scaling;
    None under dynamic scaling (the reference then does not crop prompts at all)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    scaling = getattr(model_config, "rope_scaling", None) or {}
    kind = str(scaling.get("rope_type", scaling.get("type", "")))
    if "dynamic" in kind:
        return None
    if limit is not None and scaling.get("factor") and kind not in ("", "default"):
        limit = int(limit * scaling["factor"])
    return limit


def encode_benchmark_prompt(tokenizer: Any, ex: longbench.LongExample, max_prompt_tokens: int | None,
                            chat: bool) -> tuple[list[int], bool]:
    """Token ids of one benchmark prompt: LongBench's middle truncation, then its chat-template rule.

    A prompt longer than `max_prompt_tokens` (counted without special tokens, as the reference's
    `tok_batch_encode`) keeps its first and last `max_prompt_tokens // 2` tokens, decoded and joined as
    text (LongBench pred.py). A chat model (`chat`) then gets its chat template around the prompt, except
    on LongBench's few-shot and code tasks; otherwise the tokenizer's BOS is prepended (docs/namm-spec.md
    section 12). Returns (ids, truncated).
    """
    text = ex.prompt
    ids = tokenizer(text, add_special_tokens=False).input_ids
    truncated = max_prompt_tokens is not None and len(ids) > max_prompt_tokens
    if truncated:
        half = max_prompt_tokens // 2
        text = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    if chat and ex.chat_allowed:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids, truncated
    return tokenizer(text).input_ids, truncated


def resolve_chat(tokenizer: Any, mode: str) -> bool:
    """--chat-template auto|on|off: auto = the tokenizer has a chat template (an instruction-tuned model)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--chat-template must be auto, on or off, got {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ValueError("--chat-template on: the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def make_task_examples(tasks: str, n: int, length: int, seed: int,
                       data: dict[str, Path] | None = None) -> list[Any]:
    """Examples of synthetic tasks (`vt`) and benchmark tasks (`longbench/hotpotqa`) in one list, in order.

    Synthetic task i uses seed + 1000 i (as `make_examples`); a benchmark task takes the first n rows of
    its file in `data` (`longbench.parse_data`). Benchmark prompts still need `encode_benchmark_examples`.
    """
    out: list[Any] = []
    for i, task in enumerate(t.strip() for t in tasks.split(",")):
        if longbench.is_benchmark_task(task):
            out.extend(longbench.load_task(data or {}, task, n))
        else:
            out.extend(synthetic.make_examples(task, n, length, seed=seed + 1000 * i))
    return out


def encode_benchmark_examples(examples: list[Any], tokenizer: Any, max_length: int | None = None,
                              chat: bool = False, context: int | None = None) -> None:
    """Encode every benchmark example once (`encode_benchmark_prompt`), in place: the prompt limit is
    `max_length` tokens when given (LongBench's model2maxlen), else the model's `context` minus the
    task's generation length (the reference's rule), else none."""
    for ex in examples:
        if not isinstance(ex, longbench.LongExample):
            continue
        limit = max_length or (context - ex.max_new_tokens if context is not None else None)
        if limit is not None and limit < 2:
            raise ValueError(f"{ex.task}: the model's context ({context}) leaves no room for a prompt before "
                             f"{ex.max_new_tokens} generated tokens; pass --max-length")
        ex.meta["input_ids"], ex.meta["truncated"] = encode_benchmark_prompt(tokenizer, ex, limit, chat)


def answer_batch(
    adapter: CausalLMAdapter,
    tokenizer: Any,
    policy_factory: Callable[[], Any],
    batch: list[Any],
    update_interval: int,
    chunk_size: int = 512,
) -> list[dict[str, Any]]:
    """Prefill the prompts under one fresh policy, decode greedily, score each answer (stratum = task).

    Benchmark examples decode up to their own task's generation length: a batch is answered in groups
    of one generation length (synthetic prompts form one group), each under its own fresh policy.
    """
    groups: dict[Any, list[int]] = {}
    for i, ex in enumerate(batch):
        key = ex.max_new_tokens if isinstance(ex, longbench.LongExample) else None
        groups.setdefault(key, []).append(i)
    rows: list[dict[str, Any]] = [{}] * len(batch)
    for key, idx in groups.items():
        answer = _answer_synthetic if key is None else _answer_benchmark
        for i, row in zip(idx, answer(adapter, tokenizer, policy_factory, [batch[i] for i in idx],
                                      update_interval, chunk_size)):
            rows[i] = row
    return rows


def _answer_synthetic(adapter: CausalLMAdapter, tokenizer: Any, policy_factory: Callable[[], Any],
                      batch: list[synthetic.Example], update_interval: int, chunk_size: int) -> list[dict[str, Any]]:
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


def _answer_benchmark(adapter: CausalLMAdapter, tokenizer: Any, policy_factory: Callable[[], Any],
                      batch: list[longbench.LongExample], update_interval: int,
                      chunk_size: int) -> list[dict[str, Any]]:
    """Left-pad the encoded prompts, decode `max_new_tokens` (one value in the batch), cut at EOS, score."""
    import torch

    ids = [ex.meta["input_ids"] for ex in batch]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    memory = adapter.new_memory(policy_factory(), update_interval=update_interval)
    new = adapter.generate(memory, input_ids, mask, batch[0].max_new_tokens, tokenizer.eos_token_id, chunk_size)
    kept = memory.kept_fraction()
    rows = []
    for i, ex in enumerate(batch):
        tokens = new[i].tolist()
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        if ex.stop_at_newline:
            prediction = prediction.split("\n")[0]
        rows.append({
            "id": ex.id, "task": ex.task, "stratum": ex.task, "bench": ex.bench, "prediction": prediction,
            "answers": ex.answers, "score": longbench.score_example(ex, prediction), "kept_fraction": float(kept[i]),
            "prompt_tokens": len(ex.meta["input_ids"]), "truncated": bool(ex.meta["truncated"]),
        })
    return rows
