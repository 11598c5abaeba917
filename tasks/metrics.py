"""LongBench metrics without extra dependencies.

Follows THUDM/LongBench `LongBench/metrics.py` and `eval.py` (read via the code index, commit
072a5a7). Two deliberate, documented differences: rouge-L is a plain token LCS F-score with the
`rouge` package's beta (no sentence-level union LCS), and the Chinese variants tokenise by
character instead of with jieba. code_sim uses difflib's ratio (what fuzzywuzzy falls back to
without python-Levenshtein).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ZH_PUNCT = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and articles, squeeze whitespace (SQuAD style)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch not in _ZH_PUNCT and ch not in _PUNCT and not ch.isspace())


def _f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


def _lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) with one row of memory."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


def rouge_l(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    """ROUGE-L F as in the `rouge` package: beta = P/R, F = (1+b^2) P R / (R + b^2 P)."""
    lcs = _lcs(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred_tokens), lcs / len(ref_tokens)
    beta = p / (r + 1e-12)
    return (1 + beta**2) * r * p / (r + beta**2 * p)


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_l(prediction.split(), ground_truth.split())


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_l(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: list[str] | None = None,
                         **kwargs) -> float:
    """1/k if the gold class is among the k classes named in the prediction (sub-names of gold dropped)."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"ground truth {ground_truth!r} does not match {pattern!r}")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(ground_truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Similarity of the first code line of the prediction (comments and fences skipped)."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return round(100 * difflib.SequenceMatcher(None, line, ground_truth).ratio()) / 100


DATASET2METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score,
    "multi_news": rouge_score, "vcsum": rouge_zh_score, "trec": classification_score,
    "triviaqa": qa_f1_score, "samsum": rouge_score, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum", "lsht"}


def longbench_score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """Per-example LongBench score in [0, 1]: best over the reference answers (as LongBench eval.py)."""
    if task not in DATASET2METRIC:
        raise ValueError(f"no LongBench metric for task {task!r}")
    if not answers:
        raise ValueError(f"{task}: example has no reference answers")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = DATASET2METRIC[task]
    return max(fn(prediction, a, all_classes=all_classes) for a in answers)
