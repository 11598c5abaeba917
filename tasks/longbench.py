"""Loaders for long-context benchmarks the user already has on disk (nothing is downloaded).

LongBench: `<dir>/data/<task>.jsonl` (or `<dir>/<task>.jsonl`) rows with input, context, answers,
all_classes, length. Prompts and max generation lengths are LongBench's `config/dataset2prompt.json`
and `config/dataset2maxlen.json` (THUDM/LongBench, prompt file at commit 8ae23fd; the 21-task
maxlen table as copied verbatim in several LongBench forks, the stored THUDM copy at f6227eb predates
multi_news/samsum/passage_retrieval_en). The NAMM reference evaluates these with a BOS token and greedy
decoding (docs/namm-spec.md, section 12).

InfiniteBench and ChouBun: jsonl rows from a local directory. Their official prompts were not
verified here, so they use a plain "{context}\\n\\n{input}" template unless the caller passes one;
the metric defaults to qa_f1 (ChouBun summarisation: rouge-L).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tasks.metrics import DATASET2METRIC, longbench_score, qa_f1_score, rouge_score

DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
LONGBENCH_TASKS = list(DATASET2PROMPT)
CHOUBUN_TASKS = ["wiki_qa", "edinet_qa", "corp_sec_qa", "corp_sec_sum"]


@dataclass
class LongExample:
    id: str
    task: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    all_classes: list[str] | None = None
    length: int | None = None
    meta: dict = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def load_longbench(root: str | Path, task: str, limit: int | None = None) -> list[LongExample]:
    """LongBench rows of `task` from `root/data/<task>.jsonl` (or `root/<task>.jsonl`) as prompts."""
    if task not in DATASET2PROMPT:
        raise ValueError(f"unknown LongBench task {task!r}; choose from {LONGBENCH_TASKS}")
    root = Path(root)
    path = root / "data" / f"{task}.jsonl"
    if not path.is_file() and (root / f"{task}.jsonl").is_file():
        path = root / f"{task}.jsonl"
    rows = _read_jsonl(path)[:limit]
    out = []
    for i, r in enumerate(rows):
        _need(r, ("input", "context", "answers"), f"{path}:{i + 1}")
        prompt = DATASET2PROMPT[task].format(context=r["context"], input=r["input"])
        out.append(LongExample(id=str(r.get("_id", f"{task}-{i}")), task=task, prompt=prompt,
                               answers=list(r["answers"]), max_new_tokens=DATASET2MAXLEN[task],
                               all_classes=r.get("all_classes"), length=r.get("length")))
    return out


def _load_generic(root: str | Path, task: str, template: str, max_new_tokens: int, limit: int | None,
                  bench: str) -> list[LongExample]:
    path = Path(root) / f"{task}.jsonl"
    rows = _read_jsonl(path)[:limit]
    out = []
    for i, r in enumerate(rows):
        _need(r, ("context",), f"{path}:{i + 1}")
        ans = r.get("answers", r.get("answer", r.get("output")))
        if ans is None:
            raise ValueError(f"{path}:{i + 1}: missing field 'answers' (or 'answer'/'output')")
        answers = [ans] if isinstance(ans, str) else [str(a) for a in ans]
        inp = r.get("input", r.get("question", ""))
        out.append(LongExample(id=str(r.get("id", f"{task}-{i}")), task=task,
                               prompt=template.format(context=r["context"], input=inp), answers=answers,
                               max_new_tokens=max_new_tokens, meta={"bench": bench}))
    return out


def load_infinitebench(root: str | Path, task: str, template: str = "{context}\n\n{input}",
                       max_new_tokens: int = 64, limit: int | None = None) -> list[LongExample]:
    """InfiniteBench rows from `root/<task>.jsonl` (context, input, answer)."""
    return _load_generic(root, task, template, max_new_tokens, limit, "infinitebench")


def load_choubun(root: str | Path, task: str, template: str = "{context}\n\n{input}",
                 max_new_tokens: int = 128, limit: int | None = None) -> list[LongExample]:
    """ChouBun rows from `root/<task>.jsonl` (context, input/question, answers)."""
    if task not in CHOUBUN_TASKS:
        raise ValueError(f"unknown ChouBun task {task!r}; choose from {CHOUBUN_TASKS}")
    return _load_generic(root, task, template, max_new_tokens, limit, "choubun")


def score_example(ex: LongExample, prediction: str) -> float:
    """Score in [0, 1] with the task's LongBench metric; others: qa_f1 (rouge-L for summaries)."""
    if ex.task in DATASET2METRIC and ex.meta.get("bench") is None:
        return longbench_score(ex.task, prediction, ex.answers, ex.all_classes)
    fn = rouge_score if ex.task.endswith("_sum") else qa_f1_score
    return max(fn(prediction, a) for a in ex.answers)
