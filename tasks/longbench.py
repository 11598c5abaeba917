"""Long-context benchmarks read from the user's local copies (nothing is downloaded): LongBench,
InfiniteBench and ChouBun, with their official prompts, generation lengths and metrics.

Public layouts accepted (a benchmark folder `R`):
- LongBench (THUDM/LongBench; the HF dataset's data.zip): `R/data/<task>.jsonl` or `R/<task>.jsonl`,
  LongBench-E as `<task>_e.jsonl` (task name `<task>_e`); rows {input, context, answers, length,
  all_classes, _id, ...}. Prompts and generation lengths are LongBench's `LongBench/config/
  dataset2prompt.json` and `dataset2maxlen.json`, verbatim (THUDM/LongBench commit 2e00731, including
  the official "asconcisely" typo of narrativeqa).
- InfiniteBench (OpenBMB/InfiniteBench, `scripts/download_dataset.sh`): `R/<task>.jsonl` rows {id,
  context, input, answer, options}. Prompts are `src/prompt.py`'s `yarn_mistral_templates` (the ones
  its scripts use for open-weight base models: yarn-mistral, Yi-200k), built as `src/eval_utils.py`
  `create_prompt`; labels as its `get_answer`; generation lengths `DATA_NAME_TO_MAX_NEW_TOKENS`
  (commit 88b3daa).
- ChouBun (SakanaAI/ChouBun, as the NAMM reference SakanaAI/evo-memory `task_sampler.py` reads it):
  the prompts and lengths come from the folder's own `R/config/dataset2prompt.json` and
  `R/config/dataset2maxlen.json` (the reference reads `ChouBun/config/...`; they are not bundled here
  because no verified copy was available), rows {input, context, answers, ...} in `R/data/<task>.jsonl`
  or `R/<task>.jsonl`, the template filled with the row's fields (`prompt_format.format(**row)`).

The middle truncation, the chat-template rule and BOS handling live in `tasks/language.py`, which
has the tokenizer; `CHAT_EXCLUDED` is LongBench pred.py's list of tasks answered without a chat template.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.metrics import CHOUBUN2METRIC, infinitebench_score, longbench_score

DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
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
# LongBench-E (pred.py --e): the subsets that exist with a length-balanced `_e` file.
LONGBENCH_E_TASKS = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                     "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
# LongBench pred.py: "chat models are better off without build prompts on these tasks".
CHAT_EXCLUDED = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# The NAMM reference stops samsum at the first newline (evo-memory task_sampler.py lb_taskstopgen).
STOP_AT_NEWLINE = {"samsum"}

# InfiniteBench src/prompt.py yarn_mistral_templates (commit 88b3daa), verbatim.
INFINITEBENCH_PROMPT = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is",  # noqa: E501
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",  # noqa: E501
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",  # noqa: E501
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is",  # noqa: E501
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:",  # noqa: E501
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",  # noqa: E501
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute the exact value of {func_call}. The value of {func_call} is",  # noqa: E501
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:",  # noqa: E501
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely",  # noqa: E501
}
INFINITEBENCH_MAXLEN = {
    "passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200, "longbook_choice_eng": 40,
    "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40, "math_find": 3, "math_calc": 30000,
    "code_run": 5, "code_debug": 5,
}
INFINITEBENCH_TASKS = list(INFINITEBENCH_PROMPT)
CHOUBUN_TASKS = list(CHOUBUN2METRIC)
BENCHMARKS = {"longbench": LONGBENCH_TASKS + [f"{t}_e" for t in LONGBENCH_E_TASKS],
              "infinitebench": INFINITEBENCH_TASKS, "choubun": CHOUBUN_TASKS}
# Folder names tried under --data for each benchmark (the public repositories' and datasets' names).
FOLDERS = {"longbench": ("LongBench", "longbench"), "infinitebench": ("InfiniteBench", "infinitebench"),
           "choubun": ("ChouBun", "choubun")}


@dataclass
class LongExample:
    """One benchmark prompt: `task` is `<benchmark>/<name>` (the stratum), `prompt` the filled template."""

    id: str
    task: str
    prompt: str
    answers: list[Any]
    max_new_tokens: int
    all_classes: list[str] | None = None
    length: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def bench(self) -> str:
        return self.task.partition("/")[0]

    @property
    def name(self) -> str:
        """The task's name inside its benchmark (LongBench-E's `_e` removed: same prompt and metric)."""
        name = self.task.partition("/")[2]
        return name[:-2] if self.bench == "longbench" and name.endswith("_e") else name

    @property
    def chat_allowed(self) -> bool:
        return not (self.bench == "longbench" and self.name in CHAT_EXCLUDED)

    @property
    def stop_at_newline(self) -> bool:
        return self.bench == "longbench" and self.name in STOP_AT_NEWLINE


def split_task(spec: str) -> tuple[str, str]:
    """'longbench/hotpotqa' -> ('longbench', 'hotpotqa'); an unknown benchmark or task is one error."""
    bench, _, name = spec.strip().partition("/")
    bench = bench.lower()
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r} in task {spec!r}; use longbench/, infinitebench/ or choubun/")
    if name not in BENCHMARKS[bench]:
        raise ValueError(f"unknown {bench} task {name!r}; choose from: {', '.join(BENCHMARKS[bench])}")
    return bench, name


def is_benchmark_task(spec: str) -> bool:
    return "/" in spec


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _find(roots: list[Path], names: list[str]) -> Path:
    tried = [root / name for root in roots for name in names]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"benchmark file not found: tried {', '.join(str(p) for p in tried)}")


def _roots(root: str | Path, bench: str) -> list[Path]:
    """The folder itself, then its `LongBench/`-style subfolder, so one --data folder can hold all three."""
    root = Path(root)
    return [root, *(root / sub for sub in FOLDERS[bench] if (root / sub).is_dir())]


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def load_longbench(root: str | Path, task: str, limit: int | None = None) -> list[LongExample]:
    """LongBench (or LongBench-E, `<task>_e`) rows of `task` as prompts, in file order."""
    bench, task = split_task(f"longbench/{task}")
    roots = _roots(root, bench)
    path = _find(roots, [f"data/{task}.jsonl", f"{task}.jsonl"])
    base = task[:-2] if task.endswith("_e") else task
    out = []
    for i, r in enumerate(_read_jsonl(path)[:limit]):
        _need(r, ("input", "context", "answers"), f"{path}:{i + 1}")
        prompt = DATASET2PROMPT[base].format(context=r["context"], input=r["input"])
        out.append(LongExample(id=f"longbench/{task}/{r.get('_id', i)}", task=f"longbench/{task}", prompt=prompt,
                               answers=list(r["answers"]), max_new_tokens=DATASET2MAXLEN[base],
                               all_classes=r.get("all_classes"), length=r.get("length")))
    return out


def infinitebench_prompt(task: str, row: dict) -> str:
    """InfiniteBench `create_prompt` for the open-model templates (code_run's call and math_find's prefix
    are parsed out of the input, as there)."""
    template = INFINITEBENCH_PROMPT[task]
    opts = {f"OPTION_{c}": o for c, o in zip("ABCD", row.get("options") or [])}
    if task in ("longbook_choice_eng", "code_debug") and len(opts) < 4:
        raise ValueError(f"{task}: needs 4 options, got {len(opts)}")
    if task == "code_run":
        calls = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", row["input"])
        if not calls:
            raise ValueError(f"code_run: no func_N(x) call in input {row['input'][:80]!r}")
        return template.format(func=calls[0].split("(")[0], func_call=calls[0], context=row["context"])
    if task == "math_find":
        found = re.findall(r"The .+ of", row["input"])
        if not found:
            raise ValueError(f"math_find: cannot find the target number in {row['input'][:80]!r}")
        prefix = f"What is {found[0].lower()[:-3]} in the following list?"
        return template.format(prefix=prefix, context=row["context"], input=row["input"])
    return template.format(context=row["context"], input=row.get("input", ""), question=row.get("input", ""), **opts)


def infinitebench_label(task: str, row: dict) -> list[Any]:
    """`get_answer`: choice tasks -> [option text, letter]; others the answer as a list."""
    answer = row["answer"]
    if task in ("code_debug", "longbook_choice_eng"):
        options = row.get("options") or []
        if isinstance(answer, list) and len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
            return answer
        text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        if not isinstance(text, str) or text not in options:
            raise ValueError(f"{task}: answer {answer!r} is not one of the options")
        return [text, "ABCD"[options.index(text)]]
    return answer if isinstance(answer, list) else [answer]


def load_infinitebench(root: str | Path, task: str, limit: int | None = None) -> list[LongExample]:
    """InfiniteBench rows of `task` from `<root>/<task>.jsonl`."""
    bench, task = split_task(f"infinitebench/{task}")
    path = _find(_roots(root, bench), [f"{task}.jsonl", f"data/{task}.jsonl"])
    out = []
    for i, r in enumerate(_read_jsonl(path)[:limit]):
        _need(r, ("context", "answer"), f"{path}:{i + 1}")
        try:
            prompt = infinitebench_prompt(task, r)
            label = infinitebench_label(task, r)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{i + 1}: {e}") from None
        out.append(LongExample(id=f"infinitebench/{task}/{r.get('id', i)}", task=f"infinitebench/{task}",
                               prompt=prompt, answers=label, max_new_tokens=INFINITEBENCH_MAXLEN[task]))
    return out


def _choubun_config(roots: list[Path]) -> tuple[dict, dict]:
    tables = []
    for name in ("dataset2prompt.json", "dataset2maxlen.json"):
        path = _find(roots, [f"config/{name}"])
        try:
            tables.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    return tables[0], tables[1]


def load_choubun(root: str | Path, task: str, limit: int | None = None) -> list[LongExample]:
    """ChouBun rows of `task`, prompted with the folder's own config/dataset2prompt.json (see module doc)."""
    bench, task = split_task(f"choubun/{task}")
    roots = _roots(root, bench)
    prompts, maxlens = _choubun_config(roots)
    if task not in prompts or task not in maxlens:
        raise ValueError(f"ChouBun config has no prompt or max length for {task!r}")
    path = _find(roots, [f"data/{task}.jsonl", f"{task}.jsonl"])
    out = []
    for i, r in enumerate(_read_jsonl(path)[:limit]):
        _need(r, ("answers",), f"{path}:{i + 1}")
        try:
            prompt = prompts[task].format(**r)
        except KeyError as e:
            raise ValueError(f"{path}:{i + 1}: missing field {e} used by the ChouBun prompt") from None
        answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
        out.append(LongExample(id=f"choubun/{task}/{r.get('_id', r.get('id', i))}", task=f"choubun/{task}",
                               prompt=prompt, answers=answers, max_new_tokens=int(maxlens[task]),
                               all_classes=r.get("all_classes"), length=r.get("length")))
    return out


LOADERS = {"longbench": load_longbench, "infinitebench": load_infinitebench, "choubun": load_choubun}


def load_task(data: dict[str, Path], spec: str, limit: int | None = None) -> list[LongExample]:
    """Examples of one `<benchmark>/<task>` from the benchmark's folder in `data` (see `parse_data`)."""
    bench, name = split_task(spec)
    if bench not in data:
        raise ValueError(f"task {spec} needs --data (a folder with the {bench} files, or {bench}=DIR)")
    examples = LOADERS[bench](data[bench], name, limit)
    if not examples:
        raise ValueError(f"task {spec}: no examples in its file")
    if len({ex.id for ex in examples}) != len(examples):
        raise ValueError(f"task {spec}: example ids are not unique")
    return examples


def parse_data(text: str | None) -> dict[str, Path]:
    """--data 'DIR' (every benchmark looks there and in its LongBench/InfiniteBench/ChouBun subfolder) or
    'longbench=DIR,choubun=DIR2'; a folder that does not exist is an error."""
    if not text:
        return {}
    out: dict[str, Path] = {}
    for item in text.split(","):
        bench, sep, folder = item.strip().rpartition("=")
        benches = [bench.lower()] if sep else list(BENCHMARKS)
        if sep and bench.lower() not in BENCHMARKS:
            raise ValueError(f"--data {item!r}: unknown benchmark {bench!r}; use longbench, infinitebench, choubun")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--data {folder}: no such folder")
        out.update({b: Path(folder) for b in benches})
    return out


def fingerprint(examples: list[LongExample]) -> str:
    """Content hash of the loaded examples (ids, prompts, answers, lengths): the run key's data identity,
    so a moved data folder still matches and changed files do not."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.answers, ex.max_new_tokens, ex.all_classes],
                            ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


def short_hash(obj: Any) -> str:
    """8 hex digits of a JSON-able object (a run folder name that changes with the run's options)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def score_example(ex: LongExample, prediction: str) -> float:
    """Score in [0, 1] with the task's official metric (best over the reference answers)."""
    if ex.bench == "infinitebench":
        return infinitebench_score(ex.name, prediction, ex.answers)
    return longbench_score(ex.name, prediction, ex.answers, ex.all_classes)
