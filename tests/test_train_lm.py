"""train.lm: tiny CPU smoke run, checkpoint resume, save/load round trip, greedy reference."""

import json
from pathlib import Path

import pytest
import torch

from train import lm

TINY = ["--layers", "1", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
        "--lengths", "128", "--batch-tokens", "512", "--device", "cpu", "--log-every", "1", "--ckpt-every", "2",
        "--warmup", "1", "--eval-lengths", "128", "--eval-n", "2", "--save-dtype", "float32"]
SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "lm" / "tiny-llama-mqar"


def test_smoke_train_save_load_resume(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m"
    res = lm.main(["--out", str(out), "--steps", "3", *TINY])
    assert res["step"] == 3
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 3
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    ev = json.loads((out / "eval_full_cache.json").read_text())["eval"]
    assert set(ev) == set(lm.TASKS) and all(0 <= v["128"]["score"] <= 1 for v in ev.values())

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, len(lm.VOCAB))
    # the saved weights equal the checkpointed fp32 weights
    ck = torch.load(out / "ckpt" / "model.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck[k])
    text = lm.generate_greedy(model, tok, "question : values ? answer : bako", max_new_tokens=3)
    assert isinstance(text, str) and len(text.split()) <= 3

    res2 = lm.main(["--out", str(out), "--steps", "5", "--resume", *TINY, "--eval-n", "0"])
    assert res2["step"] == 5
    assert json.loads((out / "ckpt" / "state.json").read_text())["invocations"] == 2


def test_generate_greedy_matches_hf_generate():
    args = lm.parse_args(["--out", "x", *TINY])
    torch.manual_seed(0)
    model = lm.build_model(args).eval()
    tok = lm.build_tokenizer()
    prompt = "question : which variables hold 5 ? answer : 5"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    ours = lm.generate_ids(model, ids, 6)[0]
    assert ours.tolist() == ref.tolist()


def test_bad_args():
    with pytest.raises(SystemExit):
        lm.parse_args(["--out", "x", "--tasks", "nope"])
    with pytest.raises(SystemExit):
        lm.parse_args(["--out", "x", "--heads", "8", "--kv-heads", "3"])
    with pytest.raises(SystemExit):
        lm.parse_args(["--out", "x", "--lengths", "512", "256"])


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="shipped LM not present")
def test_shipped_model_solves_needle_on_cpu():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.synthetic import make_examples, score

    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA on purpose
    exs = make_examples("niah_single", 4, 512, seed=99)
    got = [score(e.task, lm.generate_greedy(model, tok, e.prompt, 4), e.answer) for e in exs]
    assert sum(got) >= 3  # chance is 1/1000
