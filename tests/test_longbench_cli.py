"""`eval lm` on LongBench / InfiniteBench / ChouBun files in their public layouts, end to end on a tiny
character-level Llama: official prompts, middle truncation, chat-template rule, per-task generation
lengths, the official metrics on hand-made predictions, and one-line errors."""

from __future__ import annotations

import json
import string

import pytest
import torch

from tasks import longbench, metrics
from tasks.language import answer_batch, encode_benchmark_examples, make_task_examples
from transfer.cli import main

CJK = "段落文書日本の首都は東京です。質問回答：？"
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *string.printable, *dict.fromkeys(CJK)]


# ------------------------------------------------------------------------------------------ fixtures
def char_tokenizer():
    """One character = one token (so any text round-trips exactly); BOS prepended, decoded by joining."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(dict.fromkeys(VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("char-llama")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


LB_ROWS = {
    "hotpotqa": [{"input": "Who met Bob?", "context": "Passage 1: Alice met Bob in Paris.", "answers": ["Alice"],
                  "length": 7, "all_classes": None, "_id": "h1"},
                 {"input": "Where?", "context": "Passage 1: They met in Paris.", "answers": ["Paris"],
                  "length": 6, "all_classes": None, "_id": "h2"}],
    "trec": [{"input": "What is the capital of France?", "context": "Question: How far is it?\nType: Distance",
              "answers": ["Location"], "length": 12, "all_classes": ["Distance", "Location", "Number"], "_id": "t1"}],
}


@pytest.fixture
def data(tmp_path):
    """One --data folder holding the three benchmarks in their public layouts."""
    root = tmp_path / "bench"
    for task, rows in LB_ROWS.items():
        write_jsonl(root / "LongBench" / "data" / f"{task}.jsonl", rows)
    write_jsonl(root / "LongBench" / "data" / "hotpotqa_e.jsonl", LB_ROWS["hotpotqa"][:1])
    write_jsonl(root / "InfiniteBench" / "kv_retrieval.jsonl",
                [{"id": 0, "context": '{"k1": "v1", "k2": "v2"}', "input": "Key: \"k2\"\nThe value associated "
                  "with the specified key is: ", "answer": ["v2"], "options": []}])
    write_jsonl(root / "InfiniteBench" / "longbook_choice_eng.jsonl",
                [{"id": 3, "context": "A short book.", "input": "Who wrote it?", "answer": ["Ann"],
                  "options": ["Bob", "Ann", "Cid", "Dan"]}])
    cb = root / "ChouBun"
    (cb / "config").mkdir(parents=True)
    (cb / "config" / "dataset2prompt.json").write_text(json.dumps({"wiki_qa": "文書：{context}\n質問：{input}\n回答："},
                                                                  ensure_ascii=False), encoding="utf-8")
    (cb / "config" / "dataset2maxlen.json").write_text(json.dumps({"wiki_qa": 16}))
    write_jsonl(cb / "data" / "wiki_qa.jsonl",
                [{"input": "首都は？", "context": "日本の首都は東京です。", "answers": ["東京"], "_id": "w1"}])
    return root


def _examples(tasks, data, tok, **kw):
    examples = make_task_examples(tasks, 8, 64, 0, longbench.parse_data(str(data)))
    encode_benchmark_examples(examples, tok, **kw)
    return examples


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_are_the_official_templates_filled_in(data):
    tok = char_tokenizer()
    hot, hot2, trec, hot_e, kv, choice, wiki = _examples(
        "longbench/hotpotqa,longbench/trec,longbench/hotpotqa_e,infinitebench/kv_retrieval,"
        "infinitebench/longbook_choice_eng,choubun/wiki_qa", data, tok)
    expected = ("Answer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nThe following are given passages.\nPassage 1: Alice met Bob in Paris.\n\nAnswer the "
                "question based on the given passages. Only give me the answer and do not output any other words."
                "\n\nQuestion: Who met Bob?\nAnswer:")
    assert hot.prompt == expected and hot_e.prompt == expected
    assert tok.decode(hot.meta["input_ids"]) == "<s>" + expected  # BOS, then exactly the prompt
    assert hot.meta["truncated"] is False
    assert trec.prompt == ("Please determine the type of the question below. Here are some examples of questions.\n\n"
                           "Question: How far is it?\nType: Distance\nWhat is the capital of France?")
    assert [ex.max_new_tokens for ex in (hot, hot2, trec, kv, choice, wiki)] == [32, 32, 64, 50, 40, 16]
    assert [ex.id for ex in (hot, hot2, hot_e)] == ["longbench/hotpotqa/h1", "longbench/hotpotqa/h2",
                                                    "longbench/hotpotqa_e/h1"]
    assert kv.prompt == ('Extract the value corresponding to the specified key in the JSON object below.\n\n'
                         '{"k1": "v1", "k2": "v2"}\n\nKey: "k2"\nThe value associated with the specified key is: ')
    assert choice.prompt == ("Read the book and answer the question.\n\nA short book.\n\nQuestion: Who wrote it?\n"
                             "A. Bob\nB. Ann\nC. Cid\nD. Dan\n\nThe letter of the correct answer is")
    assert choice.answers == ["Ann", "B"]
    assert wiki.prompt == "文書：日本の首都は東京です。\n質問：首都は？\n回答：" and wiki.answers == ["東京"]


def test_narrativeqa_keeps_the_official_typo():
    assert longbench.DATASET2PROMPT["narrativeqa"].count("asconcisely") == 2


def test_truncation_keeps_head_and_tail_exactly(tmp_path):
    tok = char_tokenizer()
    context = "".join(string.ascii_letters[i % 52] for i in range(500))
    write_jsonl(tmp_path / "data" / "passage_count.jsonl",
                [{"input": "", "context": context, "answers": ["3"], "length": 500, "_id": "c"}])
    (ex,) = make_task_examples("longbench/passage_count", 1, 64, 0, {"longbench": tmp_path})
    full = tok(ex.prompt, add_special_tokens=False).input_ids
    assert len(full) > 101
    encode_benchmark_examples([ex], tok, max_length=101)  # odd: 50 + 50 tokens
    assert ex.meta["truncated"] is True
    assert ex.meta["input_ids"] == [tok.bos_token_id] + full[:50] + full[-50:]
    # no --max-length: the model's context (here 300) minus the task's generation length (32)
    encode_benchmark_examples([ex], tok, context=300)
    assert ex.meta["input_ids"] == [tok.bos_token_id] + full[:134] + full[-134:]
    encode_benchmark_examples([ex], tok, context=None)  # dynamic RoPE scaling: no cropping (the reference)
    assert ex.meta["input_ids"] == [tok.bos_token_id] + full and ex.meta["truncated"] is False


def test_chat_template_rule(data):
    tok = char_tokenizer()
    tok.chat_template = "[U]{{ messages[0]['content'] }}[A]"
    hot, _, trec = _examples("longbench/hotpotqa,longbench/trec", data, tok, max_length=60, chat=True)
    text = tok.decode(hot.meta["input_ids"])
    full = tok(hot.prompt, add_special_tokens=False).input_ids
    # truncation first, then the template around the cropped prompt, no BOS added by the tokenizer
    assert text == "[U]" + tok.decode(full[:30]) + tok.decode(full[-30:]) + "[A]"
    assert tok.decode(trec.meta["input_ids"]).startswith("<s>Please determine")  # few-shot task: no template


def test_context_limit_follows_the_reference():
    from types import SimpleNamespace

    from tasks.language import context_limit

    assert context_limit(SimpleNamespace(max_position_embeddings=8192, rope_scaling=None)) == 8192
    assert context_limit(SimpleNamespace(max_position_embeddings=8192, rope_scaling={"type": "linear",
                                                                                     "factor": 4.0})) == 32768
    assert context_limit(SimpleNamespace(max_position_embeddings=8192, rope_scaling={"rope_type": "dynamic",
                                                                                     "factor": 4.0})) is None


# ------------------------------------------------------------------------------------------ decoding
class _StubAdapter:
    """Records each generate call's generation length; answers 'Paris' padded with the EOS."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def new_memory(self, policy, update_interval):
        return type("M", (), {"kept_fraction": lambda s: torch.ones(self.calls[-1][0] if self.calls else 8)})()

    def generate(self, memory, input_ids, mask, max_new, eos, chunk_size):
        self.calls.append((input_ids.shape[0], max_new))
        ids = self.tok("Paris\nLondon", add_special_tokens=False).input_ids[:max_new]
        row = ids + [eos] * (max_new - len(ids))
        return torch.tensor([row] * input_ids.shape[0])


def test_each_example_decodes_its_own_tasks_length(data):
    tok = char_tokenizer()
    hot, hot2, trec = _examples("longbench/hotpotqa,longbench/trec", data, tok)
    adapter = _StubAdapter(tok)
    rows = answer_batch(adapter, tok, lambda: None, [hot, trec, hot2], update_interval=64)
    assert sorted(adapter.calls) == [(1, 64), (2, 32)]  # one group per generation length
    assert [r["id"] for r in rows] == [hot.id, trec.id, hot2.id]
    assert rows[0]["prediction"] == "Paris\nLondon" and rows[1]["task"] == "longbench/trec"
    assert rows[1]["score"] == metrics.classification_score("Paris", "Location", all_classes=trec.all_classes)


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_hand_made_predictions():
    # qa_f1: "eiffel tower paris" vs "eiffel tower": P = 2/3, R = 1
    assert metrics.qa_f1_score("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    # rouge (the `rouge` package): distinct words, sentences split at "."
    assert metrics.rouge_score("a a b", "a b b") == pytest.approx(1.0, abs=1e-7)  # token LCS would give 2/3
    assert metrics.rouge_score("a b. c", "c. a b") == pytest.approx(1.0, abs=1e-7)
    assert metrics.rouge_score("x y", "x z w") == pytest.approx(0.4, abs=1e-7)  # R 1/3, P 1/2
    assert metrics.rouge_score("", "x") == 0.0
    # classification: LongBench drops names contained in the gold one with a loop that skips the next item
    assert metrics.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC"]) == 0.5
    assert metrics.classification_score("Location or Number", "Location", all_classes=["Location", "Number"]) == 0.5
    # retrieval and count: the share of the numbers in the answer that are right
    assert metrics.retrieval_score("Paragraph 2, not Paragraph 12", "Paragraph 2") == 0.5
    assert metrics.retrieval_zh_score("段落3", "段落3") == 1.0
    assert metrics.count_score("3 or 4 paragraphs", "4") == 0.5
    # code similarity: first line without ` # //, difflib ratio 2*4/10 in whole percent
    assert metrics.code_sim_score("```\n# c\ny = 1", "x = 1") == 0.8
    assert metrics.code_sim_score("", "") == 1.0 and metrics.code_sim_score("", "x") == 0.0
    # first line only for trec/triviaqa/samsum/lsht
    assert metrics.longbench_score("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    assert metrics.longbench_score("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    # InfiniteBench
    assert metrics.infinitebench_score("passkey", "The pass key is 12345.", ["12345"]) == 1.0
    assert metrics.infinitebench_score("longbook_choice_eng", "B. Ann", ["Ann", "B"]) == 1.0
    assert metrics.infinitebench_score("longbook_choice_eng", "The answer is: C", ["Ann", "B"]) == 0.0
    assert metrics.infinitebench_score("math_calc", "[1, 4, 9, 3]", [[1, 4, 8, 3]]) == pytest.approx(0.5)
    assert metrics.infinitebench_score("kv_retrieval", 'value: "v2".', ["v2"]) == 1.0
    # rougeLsum: lines as sentences, union LCS "the cat" + "ran": P 3/5, R 1
    assert metrics.rouge_lsum("The cat sat.\nIt ran", "the cat ran") == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_end_to_end_mixed_tasks(char_lm, data, tmp_path):
    out = tmp_path / "runs"
    tasks = "longbench/hotpotqa,longbench/trec,infinitebench/kv_retrieval,choubun/wiki_qa,vt"
    rc = main(["eval", "lm", "--model", str(char_lm), "--tasks", tasks, "--data", str(data), "--limit", "2",
               "--length", "128", "--policies", "full,l2@0.5", "--batch-size", "4", "--update-interval", "16",
               "--device", "cpu", "--out", str(out), "--chat-template", "off"])
    assert rc == 0
    (run,) = [p for p in out.iterdir() if p.name.startswith("tasks-")]
    rows = [json.loads(line) for line in (run / "full" / "predictions.jsonl").read_text().splitlines()]
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert {t: len(r) for t, r in by_task.items()} == {"longbench/hotpotqa": 2, "longbench/trec": 1,
                                                      "infinitebench/kv_retrieval": 1, "choubun/wiki_qa": 1, "vt": 2}
    tok = char_tokenizer()
    for task, limit in (("longbench/hotpotqa", 32), ("longbench/trec", 64), ("choubun/wiki_qa", 16)):
        for row in by_task[task]:
            assert len(tok(row["prediction"], add_special_tokens=False).input_ids) <= limit
            assert row["stratum"] == task
    examples = {ex.id: ex for ex in make_task_examples(tasks, 2, 128, 0, longbench.parse_data(str(data)))
                if isinstance(ex, longbench.LongExample)}
    for row in rows:
        if row["id"] in examples:
            assert row["score"] == longbench.score_example(examples[row["id"]], row["prediction"])
    m = json.loads((run / "full" / "metrics.json").read_text())
    per_task = m["per_task"]
    assert per_task["longbench/hotpotqa"] == pytest.approx(sum(r["score"] for r in by_task["longbench/hotpotqa"]) / 2)
    assert m["per_benchmark"]["longbench"] == pytest.approx((per_task["longbench/hotpotqa"]
                                                             + per_task["longbench/trec"]) / 2)
    assert m["score"] == pytest.approx(sum(per_task.values()) / 5)


@pytest.mark.parametrize("tasks, extra, message", [
    ("longbench/nope", [], "error: unknown longbench task 'nope'"),
    ("bench/x", [], "error: unknown benchmark 'bench'"),
    ("hotpotqa", [], "error: unknown task 'hotpotqa'"),
    ("longbench/qasper", [], "error: benchmark file not found: tried"),
    ("infinitebench/passkey", [], "error: benchmark file not found: tried"),
    ("longbench/hotpotqa", ["--data", "/nonexistent-folder"], "error: --data /nonexistent-folder: no such folder"),
    ("longbench/hotpotqa", ["--data", None], "error: task longbench/hotpotqa needs --data"),
])
def test_cli_errors_are_one_line(char_lm, data, tmp_path, capsys, tasks, extra, message):
    extra = [] if extra == ["--data", None] else (extra or ["--data", str(data)])
    rc = main(["eval", "lm", "--model", str(char_lm), "--tasks", tasks, *extra, "--device", "cpu",
               "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(message) and "\n" not in err


def test_choubun_needs_its_config(tmp_path):
    write_jsonl(tmp_path / "data" / "wiki_qa.jsonl", [{"input": "q", "context": "c", "answers": ["a"]}])
    with pytest.raises(FileNotFoundError, match="config/dataset2prompt.json"):
        longbench.load_choubun(tmp_path, "wiki_qa")
