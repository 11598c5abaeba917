"""Tiny LLaVA-NeXT-Video: build, prompt/tokenizer, processor parity, a 2-step train, save/load round trip."""

import json

import numpy as np
import pytest
import torch

from adapters.llava_next_video import TinyVideoProcessor, build_prompt, load_processor
from tasks.synth_video import render, sample_spec
from tasks.video_bench import LETTERS, lvb_prompt
from train.video import (
    TOKENS_PER_FRAME,
    answer_questions,
    build_model,
    build_tokenizer,
    codec_like,
    main,
    normalize,
    sample_batch,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_prompt_and_tokenizer(tok):
    prompt = build_prompt(lvb_prompt("how many times did a red object appear ?", ["1", "2", "3", "4", "5"]))
    assert prompt.startswith("USER: <video>\nhow many") and prompt.endswith("directly.\n ASSISTANT:")
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert ids.count(tok.convert_tokens_to_ids("<video>")) == 1
    assert tok.decode([tok.convert_tokens_to_ids("C"), tok.eos_token_id], skip_special_tokens=True) == "C"


def test_model_config(tok):
    m = build_model(tok)
    cfg = m.config
    assert cfg.video_token_index < cfg.text_config.vocab_size and cfg.image_token_index < cfg.text_config.vocab_size
    assert cfg.text_config.num_attention_heads == 4 and cfg.text_config.num_key_value_heads == 2
    assert TOKENS_PER_FRAME == 16
    assert sum(p.numel() for p in m.parameters()) < 2_000_000


def test_processor_matches_training_batch(tok):
    """The processor's ids and pixels equal what training feeds (same expansion and normalisation)."""
    proc = TinyVideoProcessor(tok)
    rng = np.random.default_rng(0)
    spec = sample_spec(rng)
    frames = render([spec], [np.linspace(0, spec.num_frames - 1, 3, dtype=int)])[0]
    enc = proc(text=build_prompt("what color was the first object ?"), videos=frames.numpy())
    assert enc["pixel_values_videos"].shape == (1, 3, 3, 112, 112)
    assert (enc["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum() == 3 * 16
    ref = normalize(frames[None].float())
    assert torch.allclose(enc["pixel_values_videos"], ref, atol=1e-5)
    batch = sample_batch(np.random.default_rng(1), tok, 2, 3, "cpu")
    assert ((batch["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum(1) == 48).all()
    assert ((batch["labels"] != -100).sum(1) == 2).all()  # answer letter + EOS only
    count_only = sample_batch(np.random.default_rng(2), tok, 3, 1, "cpu", qtypes=(3,))
    many = tok.convert_tokens_to_ids("many")
    assert ((count_only["input_ids"] == many).sum(1) == 1).all()
    with pytest.raises(ValueError, match="placeholders"):
        proc(text="no video here", videos=frames.numpy())


def test_codec_like_keeps_flat_colours():
    x = torch.full((1, 2, 8, 8, 3), 100, dtype=torch.uint8)
    y = codec_like(x, torch.Generator().manual_seed(0), noise=0.0)
    assert torch.allclose(y, x.float(), atol=0.6)


def test_two_step_train_save_load(tmp_path, tok):
    pytest.importorskip("av")
    from transformers import LlavaNextVideoForConditionalGeneration

    from tasks.synth_video import generate_lvb

    data = generate_lvb(tmp_path / "data", n_videos=1, seed=3)
    out = tmp_path / "model"
    metrics = main(["--out", str(out), "--steps", "2", "--batch", "2", "--frames", "2", "--device", "cpu",
                    "--eval-dir", str(data), "--eval-frames", "2", "--log-every", "1", "--save-every", "1"])
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_ema_loss"])
    # The held-out score is recomputed here from the saved predictions and the set's own answers.
    truth = {r["id"]: r for r in json.loads((data / "lvb_val.json").read_text())}
    preds = [json.loads(line) for line in (out / "predictions_2f.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(truth)
    hits = [p["pred"] == LETTERS[truth[p["id"]]["correct_choice"]] for p in preds]
    held = metrics["heldout_2f"]
    assert held["n"] == 4 and held["acc"] == sum(hits) / 4
    for cat in {r["question_category"] for r in truth.values()}:
        mine = [h for p, h in zip(preds, hits) if truth[p["id"]]["question_category"] == cat]
        assert held["by_question_category"][cat] == sum(mine) / len(mine)
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["steps"] == 2 and not (out / "train_state.pt").exists()
    assert (out / "model.safetensors").is_file()

    model = LlavaNextVideoForConditionalGeneration.from_pretrained(out)
    proc = load_processor(out)
    assert proc(text=build_prompt("q"), videos=np.zeros((2, 112, 112, 3), np.uint8))["input_ids"].shape[1] > 32
    # round trip: reloaded weights give the same logits as a second reload
    enc = proc(text=build_prompt("what color was the last object ?"),
               videos=np.full((2, 112, 112, 3), 90, np.uint8))
    with torch.no_grad():
        a = model(**enc).logits
        b = LlavaNextVideoForConditionalGeneration.from_pretrained(out)(**enc).logits
    assert torch.equal(a, b)
    # The saved replies are what the reloaded model answers through the evaluation path (the adapter
    # under a full cache, one compressed context for all questions): HF generate and ours agree.
    from adapters.llava_next_video import LlavaNextVideoAdapter
    from tasks.video_bench import load_longvideobench
    from tasks.video_io import read_frames
    from transfer.policies import make_policy

    exs = load_longvideobench(data)
    frames = read_frames(exs[0].video_path, 2, size=112)
    adapter = LlavaNextVideoAdapter.from_pretrained(str(out))
    replies, _ = adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, [e.prompt for e in exs], 4)
    by_id = {p["id"]: p["reply"] for p in preds}
    assert replies == [by_id[e.id] for e in exs]
    assert answer_questions(model, proc, frames, [e.prompt for e in exs], "cpu") == replies


def test_resume(tmp_path):
    out = tmp_path / "m"
    common = ["--out", str(out), "--batch", "1", "--frames", "1", "--device", "cpu", "--steps", "3",
              "--save-every", "1", "--log-every", "1"]
    first = main([*common, "--time-budget", "0.01"])  # stops after one step, keeps its checkpoint
    assert first["steps"] == 1 and (out / "train_state.pt").is_file()
    second = main([*common, "--resume"])
    assert second["steps"] == 3 and not (out / "train_state.pt").exists()
    with pytest.raises(FileNotFoundError, match="video processor config"):
        TinyVideoProcessor.from_pretrained(tmp_path)


def test_parse_stages():
    from train.video import parse_stages, stage_at

    stages = parse_stages("1/4,8/300;0,1,2,3/8,16,32/200")
    assert stages == [((1,), [4, 8], 300), ((0, 1, 2, 3), [8, 16, 32], 500)]
    assert stage_at(stages, 299) == ((1,), [4, 8]) and stage_at(stages, 300)[1] == [8, 16, 32]
    assert stage_at(stages, 10**6) == ((0, 1, 2, 3), [8, 16, 32])
    with pytest.raises(ValueError, match="bad --stages part"):
        parse_stages("1/4/x")
    with pytest.raises(ValueError, match="qtypes must be in 0-3"):
        parse_stages("7/4/10")


# ------------------------------------------------------------------------------- the long-video task (issue 19)
TINY_LONG = ["--task", "long", "--device", "cpu", "--text-hidden", "32", "--text-layers", "1",
             "--vision-hidden", "16", "--vision-layers", "1", "--heads", "2", "--kv-heads", "1",
             "--curriculum", "32/0/0", "--frame-budget", "64", "--val-videos", "5", "--test-videos", "5",
             "--eval-frames", "32", "--log-every", "1"]


def test_long_question_logits_match_one_sequence():
    """Five questions on one cached video prefix give exactly the logits of video + one question run alone."""
    from train.video import (
        LongEncoder,
        LongStream,
        build_long_model,
        build_long_tokenizer,
        long_loss,
        long_pixels,
        parse_args,
        parse_curriculum,
        question_logits,
    )

    args = parse_args(["--out", "x", *TINY_LONG])
    tok = build_long_tokenizer()
    assert tok.unk_token_id not in tok(build_prompt(lvb_prompt(
        "which appeared first , the white object or the red object ?", ["red", "green"])))["input_ids"]
    model = build_long_model(tok, args).eval()
    assert model.config.text_config.max_position_embeddings >= 8192
    batch = LongStream(0, parse_curriculum("32/0/0", 4), 64, 4)[0]
    assert batch["frames"].shape == (2, 32, 84, 84, 3) and [len(q) for q in batch["questions"]] == [5, 5]
    enc = LongEncoder(tok).encode(batch["questions"], 32, "cpu")
    assert enc["prefix"].shape == (2, 3 + 32 * 36)
    pixel = long_pixels(batch["frames"], "cpu", 0)
    with torch.no_grad():
        logits = question_logits(model, pixel, enc)
        for v, q in [(0, 0), (1, 2), (1, 4)]:
            r = v * 5 + q
            n = int(enc["lengths"][r])
            ids = torch.cat([enc["prefix"][v], enc["q_ids"][r, :n]])[None]
            ref = model(input_ids=ids, pixel_values_videos=pixel[v:v + 1]).logits[0, enc["prefix"].shape[1]:]
            assert torch.allclose(logits[r, :n], ref, atol=1e-4)
            # the target letter sits where long_loss reads it
            assert int(enc["q_ids"][r, n - 2]) == tok.convert_tokens_to_ids("ABCDE"[batch["questions"][v][q][1]])
        loss, right = long_loss(logits, enc)
        # the auxiliary head reads each frame's last video token of the same prefix run
        ends = LongEncoder.frame_ends(enc, 32)
        assert ends[0] == 3 + 35 and ends[-1] == enc["prefix"].shape[1] - 1
        same, frame_logits = question_logits(model, pixel, enc, ends)
        full = model(input_ids=enc["prefix"][1:2], pixel_values_videos=pixel[1:2]).logits[0]
        assert torch.equal(same, logits) and torch.allclose(frame_logits[1], full[ends], atol=1e-4)
    assert right.shape == (10,) and 3.0 < loss.item() < 6.0  # ~ln(vocab) untrained


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_long_loss_falls(tmp_path):
    out = tmp_path / "m"
    main(["--out", str(out), *TINY_LONG, "--steps", "12", "--lr", "1e-2", "--warmup", "2", "--eval-every", "100"])
    losses = [r["batch_loss"] for r in _log(out) if "batch_loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses  # from ~ln(vocab) to the letters' marginal
    metrics = json.loads((out / "model" / "train_metrics.json").read_text())
    test = metrics["test"]
    assert set(test) >= {"full", "recency@0.25", "full_minus_recency"}
    assert test["full"]["kept_fraction"] == 1.0 and test["recency@0.25"]["kept_fraction"] < 0.3
    assert len(test["full_minus_recency"]["ci95"]) == 2 and test["n_videos"] == 5
    assert (out / "model" / "PROVENANCE.md").read_text().count("recency") >= 2


def test_long_resume_is_exact(tmp_path):
    """Stopped after one step by --max-minutes, exported through $OUT's limits and resumed from the pieces
    in a fresh folder: the weights equal those of an uninterrupted run, bit for bit."""
    common = [*TINY_LONG, "--steps", "3", "--eval-every", "100", "--save-every", "0"]
    straight = tmp_path / "a"
    main(["--out", str(straight), *common])
    cut = tmp_path / "b"
    first = main(["--out", str(cut), *common, "--time-budget", "0.01", "--export", str(tmp_path / "OUT")])
    assert first == {**first, "steps": 1, "finished": False}
    shipped = sorted(p.name for p in (tmp_path / "OUT").iterdir())
    assert shipped == ["train_log.jsonl", "train_state.pt.part00"]  # no model chosen yet (validation at the end)
    second = main(["--out", str(tmp_path / "c"), *common, "--resume-from", str(tmp_path / "OUT")])
    assert second["train"]["best"]["step"] == 3
    a = torch.load(straight / "train_state.pt", weights_only=False)
    c = torch.load(tmp_path / "c" / "train_state.pt", weights_only=False)
    assert a["step"] == c["step"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, c["model"][k]), k
    assert a["ema"] == c["ema"]
    with pytest.raises(ValueError, match="3-step run"):
        main(["--out", str(tmp_path / "d"), *TINY_LONG, "--steps", "5", "--resume-from", str(tmp_path / "OUT")])


def test_long_export_limits(tmp_path):
    from train.video import STATE_PART_BYTES, export

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "train_state.pt").write_bytes(b"x" * (2 * STATE_PART_BYTES + 5))
    export(out, tmp_path / "OUT")
    names = sorted(p.name for p in (tmp_path / "OUT").iterdir())
    assert names == ["model.tar.gz", "train_state.pt.part00", "train_state.pt.part01", "train_state.pt.part02"]
    assert b"".join((tmp_path / "OUT" / n).read_bytes() for n in names[1:]) == (out / "train_state.pt").read_bytes()


def test_parse_curriculum():
    from train.video import long_stage, parse_curriculum

    stages = parse_curriculum("32/0/10;48,64/0/20;64,128/64,128/0", 100)
    assert stages == [([32], [0], 10), ([48, 64], [0], 30), ([64, 128], [64, 128], 100)]
    assert long_stage(stages, 9) == ([32], [0]) and long_stage(stages, 30) == ([64, 128], [64, 128])
    with pytest.raises(ValueError, match="bad --curriculum part"):
        parse_curriculum("16/0/10", 20)
    with pytest.raises(ValueError, match="bad --curriculum part"):
        parse_curriculum("32/x", 20)
    with pytest.raises(ValueError, match="frames >= -2"):
        parse_curriculum("64/-3/0", 20)
    from train.video import LongStream

    half = LongStream(0, parse_curriculum("64/-2/0", 2), 64, 2)[1]
    assert half["frames"].shape == (2, 32, 84, 84, 3)
    from train.video import fit_steps

    # 10 steps at 1 s and 20 at 2 s are fixed (50 s); 85 % of 500 s leaves 375 s for 0.5 s steps: 750 more
    assert fit_steps(parse_curriculum("32/0/10;48/0/20;64/0/0", 10**9), [1.0, 2.0, 0.5], 500) == 780
    with pytest.raises(ValueError, match="more minutes"):
        fit_steps(parse_curriculum("32/0/10;64/0/0", 10**9), [1.0, 2.0], 60)
