"""train.lm: a micro model learns a lookup (trainer + loss mask + greedy decoding), resume, DDP, shipped LMs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import synthetic
from train import lm

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
        "--lengths", "128", "--batch-tokens", "512", "--device", "cpu", "--log-every", "1", "--ckpt-every", "2",
        "--warmup", "1", "--eval-lengths", "128", "--eval-n", "2", "--save-dtype", "float32"]
SHIPPED = ROOT / "artifacts" / "lm" / "tiny-llama-mqar"
NEW = ROOT / "artifacts" / "lm" / "llama-8k-recall"

# a fixed key -> number table: learnable from the question alone, so only a broken trainer stays at chance
TABLE = {synthetic.KEY_WORDS[i]: str(n) for i, n in zip(range(4), (17, 402, 9, 655))}


def _lookup_sequence(task, length, rng):
    """BOS + filler + 'question : K' -> TABLE[K] EOS, repeated; target mask on answers and EOS."""
    tail, mask_tail = [], []
    while len(tail) + 5 <= length // 2:
        key = list(TABLE)[int(rng.integers(len(TABLE)))]
        tail += ["question", ":", key, TABLE[key], synthetic.EOS]
        mask_tail += [0, 0, 0, 1, 1]
    words = [synthetic.BOS] + synthetic._filler(rng, length - len(tail)) + tail
    ids = np.array([synthetic.WORD_TO_ID[w] for w in words])
    mask = np.zeros(len(words), dtype=bool)
    mask[len(words) - len(mask_tail):] = np.asarray(mask_tail, dtype=bool)
    return ids, mask


def test_micro_model_learns_lookup_and_decodes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "make_training_sequence", _lookup_sequence)
    out = tmp_path / "m"
    lm.main(["--out", str(out), "--tasks", "mqar", "--steps", "80", "--lr", "1e-2", *TINY, "--warmup", "5",
             "--ckpt-every", "1000", "--eval-n", "0"])
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["acc"]["mqar@128"], np.mean([r["acc"]["mqar@128"] for r in log[-5:]])
    # answer-token accuracy counts the number and EOS; 0.5 would be "EOS learned, numbers at chance"
    assert first < 0.1 and last > 0.9, (first, last)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    filler = " ".join(synthetic._filler(np.random.default_rng(1), 40))
    for key, value in TABLE.items():
        assert lm.generate_greedy(model, tok, f"{filler} question : {key}", max_new_tokens=4) == value


def test_smoke_train_save_load_resume(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    res = lm.main(["--out", str(out), "--steps", "3", "--tasks", "mqar", "count", "copy", *TINY])
    assert res["step"] == 3
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 3
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    ev = json.loads((out / "eval_full_cache.json").read_text())["eval"]
    assert set(ev) == {"mqar", "count"}  # training-only formats are not evaluated
    exs = synthetic.make_examples("mqar", 2, 128, seed=1234)
    assert ev["mqar"]["128"]["chance"] == pytest.approx(np.mean([e.chance for e in exs]))

    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, len(lm.VOCAB))
    ck = torch.load(out / "ckpt" / "model.pt")  # the saved weights equal the checkpointed fp32 weights
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck[k])

    res2 = lm.main(["--out", str(out), "--steps", "5", "--resume", "--tasks", "mqar", *TINY, "--eval-n", "0"])
    assert res2["step"] == 5
    assert json.loads((out / "ckpt" / "state.json").read_text())["invocations"] == 2

    # --init-from: same weights, fresh optimiser, the old run's step/stage continue with --state-from
    out3 = tmp_path / "m3"
    res3 = lm.main(["--out", str(out3), "--init-from", str(out), "--state-from", str(out / "ckpt" / "state.json"),
                    "--steps", "6", "--tasks", "mqar", *TINY, "--eval-n", "0"])
    assert res3["step"] == 6
    fresh = lm.build_model(lm.parse_args(["--out", "x", *TINY]))
    lm.load_weights(fresh, out)  # the safetensors dir written after the resumed run (tied head restored)
    ref = AutoModelForCausalLM.from_pretrained(out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_data_parallel_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "train.lm",
           "--out", str(tmp_path / "d"), "--steps", "3", "--tasks", "mqar", "vt", *TINY, "--eval-n", "0"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert json.loads((tmp_path / "d" / "ckpt" / "state.json").read_text())["step"] == 3
    assert len((tmp_path / "d" / "train_log.jsonl").read_text().splitlines()) == 3  # rank 0 logs alone


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
    with pytest.raises(SystemExit):
        lm.parse_args(["--out", "x", "--state-from", "s.json"])
    assert lm.parse_args(["--out", "x", "--tasks", "copy", "count"]).tasks == ["copy", "count"]


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="shipped LM not present")
def test_shipped_model_solves_needle_on_cpu():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA on purpose
    exs = synthetic.make_examples("niah_single", 4, 512, seed=99)
    got = [synthetic.score(e.task, lm.generate_greedy(model, tok, e.prompt, 4), e.answer) for e in exs]
    assert sum(got) >= 3  # chance is 1/1000


@pytest.mark.skipif(not (NEW / "model.safetensors").exists(), reason="8k source LM not present")
def test_8k_source_model_recalls_on_cpu():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(NEW, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(NEW)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.max_position_embeddings >= 8192
    for task in ("mqar", "vt"):  # chance: 1/85 records; 4 of 12 variables
        exs = synthetic.make_examples(task, 4, 512, seed=99)
        got = [synthetic.score(task, lm.generate_greedy(model, tok, e.prompt, 6), e.answer) for e in exs]
        assert sum(got) >= 3.5, (task, got)
