"""Synthetic tasks, word tokenizer, LongBench loaders and metrics."""

import json
from pathlib import Path

import numpy as np
import pytest

from tasks import longbench, metrics
from tasks.synthetic import (
    EOS,
    EXTRA_WORDS,
    FILLER_WORDS,
    TASKS,
    TRAIN_ONLY_TASKS,
    VOCAB,
    WORD_TO_ID,
    build_tokenizer,
    make_examples,
    make_training_sequence,
    score,
)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [128, 1000, 2048])
def test_examples_exact_length_and_vocab(task, length):
    exs = make_examples(task, 3, length, seed=7)
    for e in exs:
        words = e.prompt.split()
        assert e.length == length == len(words)
        assert all(w in WORD_TO_ID for w in words + e.answer.split())
        assert 0 < e.chance < 1


@pytest.mark.parametrize("task", list(TASKS))
def test_generator_is_deterministic_and_seeded(task):
    a = make_examples(task, 4, 512, seed=3)
    b = make_examples(task, 4, 512, seed=3)
    c = make_examples(task, 4, 512, seed=4)
    assert [(x.prompt, x.answer) for x in a] == [(x.prompt, x.answer) for x in b]
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert len({x.prompt for x in a}) == 4


def test_answers_present_in_context():
    for e in make_examples("niah_multikey", 5, 600, seed=1):
        key = e.prompt.split()[-1]
        assert f"the magic number for {key} {e.answer} ." in e.prompt
    for e in make_examples("mqar", 5, 600, seed=1):
        key = e.prompt.split()[-1]
        assert f" {key} {e.answer} ;" in e.prompt
    for e in make_examples("vt", 5, 600, seed=1):
        words = e.prompt.split()
        src = words[-1]
        for var in e.answer.split():  # the chain in order
            assert f"assign {src} {var} ." in e.prompt
            src = var
    for e in make_examples("passage", 5, 600, seed=1):
        snippet = e.prompt.split(" : ")[-2].split(" ?")[0].split(" : ")[-1]
        block = e.prompt.split(f"passage {e.answer} : ")[1].split(" passage ")[0]
        assert snippet in block


def test_fwe_answer_is_top3_by_count():
    for e in make_examples("fwe", 5, 1024, seed=2):
        words = e.prompt.split(" question ")[0].split()[2:]
        vals, counts = np.unique(words, return_counts=True)
        top = list(vals[np.argsort(-counts)][:3])
        assert top == e.answer.split()


def test_count_answer_is_the_key_count():
    seen = set()
    for e in make_examples("count", 20, 1024, seed=3):
        context, question = e.prompt.split(" question : ")
        key = question.split()[4]  # "how many times does K appear ? answer :"
        assert question == f"how many times does {key} appear ? answer :"
        assert str(context.split().count(key)) == e.answer
        seen.add(e.answer)
    assert len(seen) >= 4  # counts vary (1-6), so a constant guess cannot pass
    assert score("count", "3 </s>", "3") == 1.0 and score("count", "4", "3") == 0.0


def test_fwe_decoy_top3_overall_but_decoys_dominate_the_tail():
    for e in make_examples("fwe_decoy", 5, 2048, seed=2):
        words = e.prompt.split(" question ")[0].split()[2:]
        vals, counts = np.unique(words, return_counts=True)
        assert list(vals[np.argsort(-counts, kind="stable")][:3]) == e.answer.split()
        tail = words[-len(words) // 4:]  # what a 25 % recency cache would keep
        tv, tc = np.unique(tail, return_counts=True)
        assert not set(tv[np.argsort(-tc)][:3]) & set(e.answer.split())


def test_copy_training_sequence_repeats_a_context_segment():
    rng = np.random.default_rng(4)
    for length in (256, 4096):
        ids, mask = make_training_sequence("copy", length, rng)
        words = [VOCAB[i] for i in ids]
        # each answer run follows "repeat : w1" and equals what follows w1's first occurrence in the context
        starts = [i for i, w in enumerate(words) if w == "repeat"]
        assert starts and len(starts) == max(1, min(4, length // 1024))
        for s in starts:
            first = words[s + 2]
            run = []
            j = s + 3
            while words[j] != EOS:
                assert mask[j]
                run.append(words[j])
                j += 1
            assert mask[j]  # EOS is a target too
            ctx = words[1:starts[0]]
            assert any(ctx[i:i + len(run) + 1] == [first] + run for i in range(len(ctx)))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_examples("copy", 1, 256)  # training only


def test_vocab_ids_of_the_first_model_never_move():
    old = json.loads((Path(__file__).resolve().parents[1] / "artifacts" / "lm" / "tiny-llama-mqar"
                      / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(VOCAB) == len(old) + len(EXTRA_WORDS)
    assert all(WORD_TO_ID[w] == i for w, i in old.items())
    assert not set(EXTRA_WORDS) & set(FILLER_WORDS)


def test_training_sequence_masks_answers():
    rng = np.random.default_rng(0)
    for task in [*TASKS, *TRAIN_ONLY_TASKS]:
        ids, mask = make_training_sequence(task, 512, rng)
        assert ids.shape == (513,) and mask.shape == (513,) and ids[0] == WORD_TO_ID["<s>"]
        assert mask.sum() >= 2 and ids[-1] == WORD_TO_ID[EOS] and mask[-1]
        # every masked token is an answer word (number, variable, filler word) or EOS, never a template word
        assert not any(VOCAB[i] in ("question", "answer", ":", "?") for i in ids[mask])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_examples("nope", 1, 512)
    with pytest.raises(ValueError, match="length_tokens"):
        make_examples("mqar", 1, 64)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        score("nope", "1", "1")


def test_score_hand_cases():
    assert score("niah_single", "42 </s> junk", "42") == 1.0
    assert score("niah_single", " 42.", "42") == 1.0
    assert score("niah_single", "43", "42") == 0.0
    assert score("passage", "", "7") == 0.0
    assert score("vt", "x3 x1 x9 x2", "x1 x2 x3 x4") == 0.75
    assert score("vt", "x1 x1 x1 x1", "x1 x2 x3 x4") == 0.25
    assert score("fwe", "cat dog </s> fox", "dog cat fox") == pytest.approx(2 / 3)
    TASKS["_pos"] = TASKS["mqar"].__class__("_pos", "", "positional", "")
    try:
        assert score("_pos", "1 9 3", "1 2 3") == pytest.approx(2 / 3)
    finally:
        del TASKS["_pos"]


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    e = make_examples("vt", 1, 300, seed=0)[0]
    ids = tok(e.prompt)["input_ids"]
    assert len(ids) == e.length + 1 and ids[0] == tok.bos_token_id
    assert ids[1:] == [WORD_TO_ID[w] for w in e.prompt.split()]
    assert tok.decode(ids, skip_special_tokens=True) == e.prompt
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2(e.prompt)["input_ids"] == ids
    assert (tok2.eos_token, tok2.pad_token, tok2.unk_token) == ("</s>", "<pad>", "<unk>")
    assert tok2("zzz 42")["input_ids"] == [tok.bos_token_id, tok.unk_token_id, WORD_TO_ID["42"]]


# ----------------------------------------------------------------------------- LongBench


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_longbench_loader(tmp_path):
    rows = [{"input": "Who?", "context": "Alice met Bob.", "answers": ["Alice"], "length": 3,
             "all_classes": None, "_id": "a1"},
            {"input": "Where?", "context": "In Paris.", "answers": ["Paris", "paris"], "length": 2,
             "all_classes": None, "_id": "a2"}]
    _write_jsonl(tmp_path / "data" / "hotpotqa.jsonl", rows)
    exs = longbench.load_longbench(tmp_path, "hotpotqa")
    assert [e.id for e in exs] == ["longbench/hotpotqa/a1", "longbench/hotpotqa/a2"]
    assert exs[0].max_new_tokens == 32 and exs[0].length == 3
    assert exs[0].prompt.startswith("Answer the question based on the given passages.")
    assert "Alice met Bob." in exs[0].prompt and exs[0].prompt.endswith("Question: Who?\nAnswer:")
    assert longbench.score_example(exs[0], "alice") == 1.0
    assert longbench.score_example(exs[1], "It is in Paris") == pytest.approx(2 * (1 / 4) / (1 + 1 / 4))
    assert len(longbench.load_longbench(tmp_path, "hotpotqa", limit=1)) == 1
    assert set(longbench.DATASET2PROMPT) == set(longbench.DATASET2MAXLEN) == set(metrics.DATASET2METRIC)


def test_longbench_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        longbench.load_longbench(tmp_path, "qasper")
    with pytest.raises(ValueError, match="unknown longbench task"):
        longbench.load_longbench(tmp_path, "nope")
    _write_jsonl(tmp_path / "qasper.jsonl", [{"input": "q", "answers": ["a"]}])
    with pytest.raises(ValueError, match="missing field"):
        longbench.load_longbench(tmp_path, "qasper")
    (tmp_path / "trec.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        longbench.load_longbench(tmp_path, "trec")


def test_infinitebench_and_choubun_loaders(tmp_path):
    _write_jsonl(tmp_path / "kv_retrieval.jsonl", [{"context": "k1: v1", "input": "k1?", "answer": "v1"}])
    ex = longbench.load_infinitebench(tmp_path, "kv_retrieval")[0]
    assert ex.prompt == ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                         "k1: v1\n\nk1?") and ex.answers == ["v1"]
    assert longbench.score_example(ex, "v1") == 1.0
    _write_jsonl(tmp_path / "corp_sec_sum.jsonl", [{"context": "c", "question": "q", "answers": ["a b c"]}])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "dataset2prompt.json").write_text('{"corp_sec_sum": "{context} {question}"}')
    (tmp_path / "config" / "dataset2maxlen.json").write_text('{"corp_sec_sum": 128}')
    ex = longbench.load_choubun(tmp_path, "corp_sec_sum")[0]
    assert longbench.score_example(ex, "a b c") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown choubun task"):
        longbench.load_choubun(tmp_path, "x")
    with pytest.raises(ValueError, match="no prompt"):  # the folder's config/ lacks wiki_qa
        longbench.load_choubun(tmp_path, "wiki_qa")


def test_metrics_hand_cases():
    assert metrics.qa_f1_score("The cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.qa_f1_score("", "x") == 0.0
    assert metrics._lcs("a b c d".split(), "a c d e".split()) == 3
    # LCS 3 of pred 4 / ref 4 tokens: P = R = 0.75 -> F = 0.75
    assert metrics.rouge_score("a b c d", "a c d e") == pytest.approx(0.75)
    assert metrics.rouge_score("x", "y") == 0.0
    cls = ["LOC", "NUM", "HUM", "NUMBER"]
    assert metrics.classification_score("Type: NUM", "NUM", all_classes=cls) == 1.0
    assert metrics.classification_score("NUM or HUM", "NUM", all_classes=cls) == 0.5
    assert metrics.classification_score("NUMBER", "NUMBER", all_classes=cls) == 1.0  # NUM dropped
    assert metrics.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert metrics.retrieval_score("Paragraph 3 or 12", "Paragraph 12") == 0.5
    assert metrics.retrieval_zh_score("段落5", "段落5") == 1.0
    assert metrics.count_score("there are 7 paragraphs", 7) == 1.0
    assert metrics.count_score("none", 7) == 0.0
    assert metrics.code_sim_score("\n# comment\nx = 1\n", "x = 1") == 1.0
    assert metrics.longbench_score("trec", "NUM\nHUM", ["NUM"], cls) == 1.0
    assert metrics.qa_f1_zh_score("北京", "北京市") == pytest.approx(0.8)
    with pytest.raises(ValueError):
        metrics.longbench_score("nope", "a", ["a"])
