"""Benchmark metrics (LongBench, InfiniteBench, ChouBun) without extra dependencies.

LongBench: THUDM/LongBench `LongBench/metrics.py` and `LongBench/eval.py` (commit 2e00731, read via a
mirror). They call three packages we re-implement here, following the installed sources read for this:
- ROUGE-L is the `rouge` package (1.0.1, what LongBench's unpinned requirement installs):
  `Rouge().get_scores(...)["rouge-l"]["f"]` splits both texts into sentences at ".", and the score is
  the union LCS over sentence pairs counted as a *set of words*, against the number of *distinct* words
  (`exclusive=True`), F = 2PR / (P + R + 1e-8); any exception (e.g. an empty text) scores 0.
  Difference: that package reconstructs the LCS recursively and so fails (LongBench scores 0) on
  sentence pairs longer than about 1000 words together; we compute those pairs instead.
- code_sim is fuzzywuzzy 0.18 `fuzz.ratio` without python-Levenshtein: difflib's ratio, rounded to
  an integer percent; equal strings 100, an empty one 0.
- the Chinese metrics tokenise with jieba and ChouBun's Japanese ones with fugashi (MeCab, as the NAMM
  reference's `utils_longbench.py`). When those packages are installed they are used; otherwise text
  is split into characters (`metric_tokenizers()` says which, and eval runs record it in their run key).
InfiniteBench: OpenBMB/InfiniteBench `src/compute_scores.py` (commit 88b3daa); its summary metric is
HF `evaluate`'s rougeLsum (the `rouge_score` package 0.1.2: lower-cased alphanumeric tokens, sentences
split at newlines, summary-level union LCS without double counting), re-implemented here.
ChouBun's own metric file (`choubun_metrics.py` of the reference) is not public in the sources read;
`qa_f1_ja_score`/`rouge_ja_score` follow LongBench's Chinese variants with the Japanese tokeniser.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from collections.abc import Callable

_PUNCT = set(string.punctuation)
_ZH_PUNCT = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


# ------------------------------------------------------------------------------ word segmentation
@functools.cache
def _segmenter(lang: str) -> Callable[[str], list[str]] | None:
    """jieba (zh) or fugashi/MeCab (ja) when installed, loaded on first use; None otherwise."""
    try:
        if lang == "zh":
            import jieba

            return lambda s: list(jieba.cut(s, cut_all=False))
        from fugashi import Tagger

        tagger = Tagger("-Owakati")
        return lambda s: tagger.parse(s).split()
    except Exception:  # not installed, or fugashi without a dictionary
        return None


def metric_tokenizers() -> dict[str, str]:
    """Which word segmentation the Chinese and Japanese metrics use here (recorded in run keys)."""
    return {"zh": "jieba" if _segmenter("zh") else "characters", "ja": "fugashi" if _segmenter("ja") else "characters"}


def _cut(text: str, lang: str) -> list[str]:
    cut = _segmenter(lang)
    return cut(text) if cut else list(text)


# ------------------------------------------------------------------------------ QA F1
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


def _cjk_tokens(text: str, lang: str) -> list[str]:
    return [t for t in (normalize_zh_answer(tok) for tok in _cut(text, lang)) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """jieba words (or characters), each normalised, empty ones dropped (LongBench qa_f1_zh_score)."""
    return _f1(_cjk_tokens(prediction, "zh"), _cjk_tokens(ground_truth, "zh"))


def qa_f1_ja_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _f1(_cjk_tokens(prediction, "ja"), _cjk_tokens(ground_truth, "ja"))


# ------------------------------------------------------------------------------ ROUGE-L (`rouge` 1.0.1)
def _lcs_table(x: list[str], y: list[str]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table


def _lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length."""
    return _lcs_table(a, b)[-1][-1] if a and b else 0


def _recon_lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one LCS of x and y, read back with the `rouge` package's tie rule (prefer j - 1)."""
    table = _lcs_table(x, y)
    i, j, words = len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """`Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]`, 0 where the package raises."""
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _recon_lcs_words(r.split(" "), h.split(" "))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_score(" ".join(_cut(prediction, "zh")), " ".join(_cut(ground_truth, "zh")))


def rouge_ja_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_score(" ".join(_cut(prediction, "ja")), " ".join(_cut(ground_truth, "ja")))


# ------------------------------------------------------------------------------ other LongBench metrics
def classification_score(prediction: str, ground_truth: str, all_classes: list[str] | None = None,
                         **kwargs) -> float:
    """1/k if the gold class is among the k classes named in the prediction.

    Class names contained in the gold name are dropped with LongBench's loop, which removes items from
    the list it iterates over (so of two such names in a row the second stays); kept as it is.
    """
    if not all_classes:
        raise ValueError("classification_score needs all_classes")
    matches = [c for c in all_classes if c in prediction]
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
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


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` on its pure-Python path (difflib)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Similarity of the first code line of the prediction (lines with `, # or // skipped)."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return fuzz_ratio(line, ground_truth) / 100


DATASET2METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score,
    "multi_news": rouge_score, "vcsum": rouge_zh_score, "trec": classification_score,
    "triviaqa": qa_f1_score, "samsum": rouge_score, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# ChouBun tasks as the NAMM reference scores them (SakanaAI/evo-memory utils_longbench.py).
CHOUBUN2METRIC = {"wiki_qa": qa_f1_ja_score, "edinet_qa": qa_f1_ja_score, "corp_sec_qa": qa_f1_ja_score,
                  "corp_sec_sum": rouge_ja_score}
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum", "lsht"}


def longbench_score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """Per-example LongBench (or ChouBun) score in [0, 1]: best over the references (LongBench eval.py)."""
    fn = DATASET2METRIC.get(task) or CHOUBUN2METRIC.get(task)
    if fn is None:
        raise ValueError(f"no LongBench metric for task {task!r}")
    if not answers:
        raise ValueError(f"{task}: example has no reference answers")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(fn(prediction, a, all_classes=all_classes) for a in answers)


# ------------------------------------------------------------------------------ InfiniteBench
def _rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lower case, non-alphanumerics to spaces, no stemming."""
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if re.fullmatch(r"[a-z0-9]+", t)]


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    table = _lcs_table(ref, can)
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out


def rouge_lsum(prediction: str, target: str) -> float:
    """rouge_score 0.1.2 rougeLsum F (sentences = lines, union LCS, no double counting)."""
    ref = [_rouge_tokens(s) for s in target.split("\n") if s]
    can = [_rouge_tokens(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, ref)), sum(map(len, can))
    if not ref or not can or not m or not n:
        return 0.0
    cnt_r = Counter(t for s in ref for t in s)
    cnt_c = Counter(t for s in can for t in s)
    hits = 0
    for r in ref:
        union = sorted(set().union(*(_lcs_indices(r, c) for c in can)))
        for t in (r[i] for i in union):
            if cnt_c[t] > 0 and cnt_r[t] > 0:
                hits += 1
                cnt_c[t] -= 1
                cnt_r[t] -= 1
    p, r_ = hits / n, hits / m
    return 2 * p * r_ / (p + r_) if p + r_ > 0 else 0.0


def _first_int(prediction: str) -> str:
    return next((item for item in re.split("[^0-9]", prediction) if item), "")


def _words(prediction: str, chars: str) -> list[str]:
    return _replace(prediction, chars).split()


def _squeeze(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _ib_code_run(pred: str, label: list) -> bool:
    words = _words(pred.strip(), "\n.`'\":")
    try:
        return bool(words) and int(words[-1]) == label[0]
    except ValueError:
        return False


def _ib_code_debug(pred: str, label: list) -> bool:
    pred = pred.strip()
    fn_name, letter = label[0], label[1]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    for c in ["\n", "`", "'", '"', "-", "*", "Option", "option"]:
        pred = pred.replace(c, " ")
    pred = _squeeze(pred)
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return rest.startswith(letter) or rest.startswith(fn_name)
    return False


def _ib_math_find(pred: str, label: list) -> bool:
    target = label[0]
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return False
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ValueError(f"math_find: expected a numeric answer, got {target!r}")
    return (int(found.group(0)) if isinstance(target, int) else float(found.group(0))) == target


def _ib_choice(pred: str, label: list) -> bool:
    pred = pred.strip()
    if not pred:
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze(_replace(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return any(rest.startswith(s) for s in label)
    for word in pred.split():
        if word in "ABCD":
            return word in label
    return False


def _replace(text: str, chars: str) -> str:
    for c in chars:
        text = text.replace(c, " ")
    return text


def _ib_math_calc(pred: str, label: list) -> float:
    if isinstance(label[0], list):
        label = label[0]
    nums = [int(x) for x in re.split("[^0-9]", pred) if x]
    count = 0
    for i, value in enumerate(label):
        if i >= len(nums) or nums[i] != value:
            break
        count += 1
    return count / len(label)


def _ib_qa_zh(pred: str, label: list) -> float:
    """InfiniteBench's Chinese QA F1: one character, one token (no jieba)."""
    return max(_f1(list(normalize_zh_answer(pred)), list(normalize_zh_answer(g))) for g in label)


INFINITEBENCH2METRIC: dict[str, Callable[[str, list], float]] = {
    "passkey": lambda p, lab: float(_first_int(p) == lab[0]),
    "number_string": lambda p, lab: float(_first_int(p) == lab[0]),
    "kv_retrieval": lambda p, lab: float(lab[0] in _words(p, "\n:\"'.,?!{}")),
    "longdialogue_qa_eng": lambda p, lab: float(lab[0] in [w.upper() for w in _words(p.strip(), "\n:\"'.,?!{}")]),
    "longbook_qa_eng": lambda p, lab: max(qa_f1_score(p, g) for g in lab),
    "longbook_qa_chn": _ib_qa_zh,
    "longbook_sum_eng": lambda p, lab: rouge_lsum(p, lab[0]),
    "longbook_choice_eng": lambda p, lab: float(_ib_choice(p, lab)),
    "math_find": lambda p, lab: float(_ib_math_find(p, lab)),
    "math_calc": _ib_math_calc,
    "code_run": lambda p, lab: float(_ib_code_run(p, lab)),
    "code_debug": lambda p, lab: float(_ib_code_debug(p, lab)),
}


def infinitebench_score(task: str, prediction: str, label: list) -> float:
    """Per-example InfiniteBench score in [0, 1] (compute_scores.py `get_score_one`); label as `get_answer`."""
    fn = INFINITEBENCH2METRIC.get(task)
    if fn is None:
        raise ValueError(f"no InfiniteBench metric for task {task!r}")
    return float(fn(prediction, label))
