"""`namm-transfer eval video` end to end on a tiny random model and mp4s in the LongVideoBench layout, and the
default: the shipped long-video model on the generated test split of tasks/long_video.py."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import random_namm_theta
from test_video_adapter import SIZE, tiny_llava

from adapters.llava_next_video import LlavaNextVideoAdapter, TinyVideoProcessor
from eval import video
from tasks.synth_video import render, sample_spec
from tasks.video_io import write_mp4
from train.video import build_tokenizer
from transfer.checkpoint import save_namm
from transfer.namm import NAMMConfig, NormStats


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_eval")
    tok = build_tokenizer()
    tiny_llava(tok).save_pretrained(root / "model")
    TinyVideoProcessor(tok, size=SIZE).save_pretrained(root / "model")
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    save_namm(root / "namm", random_namm_theta(), norm, NAMMConfig(), provenance={"source": "test, random"})
    data = root / "lvb"
    rng = np.random.default_rng(0)
    records = []
    for v in range(3):
        path = data / "videos" / f"v{v}.mp4"
        if v == 1:  # corrupt: a header-less blob
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x00\x01not an mp4" * 50)
        else:
            spec = sample_spec(rng, num_frames=12)  # 112 px; read_frames resizes to the model's 56
            write_mp4(path, render([spec])[0].numpy(), fps=4)
        for q, cat in enumerate(("first", "count")):
            records.append({"id": f"v{v}_{q}", "video_path": path.name, "question": f"what is {cat} ?",
                            "candidates": ["red", "green", "blue", "cyan", "white"], "correct_choice": (v + q) % 5,
                            "duration_group": 12, "question_category": cat})
    (data / "lvb_val.json").write_text(json.dumps(records))
    # the same videos as a test split (no answers) with subtitles in both formats, and as an MLVU subset
    test = root / "lvb_test"
    shutil.copytree(data / "videos", test / "videos")
    subs = {"v0.json": [{"timestamp": [5.2, 6.3], "text": "red"}, {"timestamp": [6.9, 7.3], "text": "blue"}],
            "v1.json": [],
            "v2.json": [{"start": "00:00:00.500", "end": "00:00:01.500", "line": "green"}]}
    (test / "subtitles").mkdir()
    for name, lines in subs.items():
        (test / "subtitles" / name).write_text(json.dumps(lines))
    rows = [{k: v for k, v in r.items() if k != "correct_choice"} | {
        "id": "t" + r["id"][1:], "duration": 3.0, "subtitle_path": r["video_path"].replace(".mp4", ".json"),
        "starting_timestamp_for_subtitles": 5.0 if r["video_path"] == "v0.mp4" else 0.0} for r in records]
    (test / "lvb_test_wo_gt.json").write_text(json.dumps(rows))
    mlvu = root / "mlvu"
    for task, v in (("needle", 0), ("count", 2), ("order", 0)):
        (mlvu / "json").mkdir(parents=True, exist_ok=True)
        (mlvu / "video" / f"3_{task}").mkdir(parents=True)
        shutil.copy(data / "videos" / f"v{v}.mp4", mlvu / "video" / f"3_{task}" / f"v{v}.mp4")
        recs = [{"video": f"v{v}.mp4", "duration": 3.0, "question": f"what is {task} ?", "question_type": task,
                 "candidates": ["red", "green", "blue", "white"], "answer": ans} for ans in ("green", "blue")]
        (mlvu / "json" / f"3_{task}.json").write_text(json.dumps(recs))
    return root


def _args(root, *extra):
    p = argparse.ArgumentParser()
    video.add_arguments(p)
    return p.parse_args([
        "--benchmark", "longvideobench", "--data", str(root / "lvb"), "--model", str(root / "model"),
        "--policies", "full,h2o,namm", "--budget", "match", "--namm", str(root / "namm"), "--frames", "8",
        "--update-interval", "16", "--max-new-tokens", "4", "--device", "cpu", "--out", str(root / "runs"), *extra,
    ])


def test_eval_video_end_to_end_and_resume(setup, capsys, monkeypatch):
    results = video.run(_args(setup))
    assert list(results) == ["namm", "full", "h2o@match", "chance", "majority-letter"]
    # the answered questions' letters are A, B (v0) and C, D (v2): a tie, broken to the first letter
    assert results["majority-letter"]["letter"] == "A" and results["majority-letter"]["score"] == 0.25
    assert results["chance"]["score"] == pytest.approx(0.2) and results["chance"]["n"] == 2
    out = capsys.readouterr().out
    assert "h2o@match" in out and "could not be read" in out
    run_root = setup / "runs" / "longvideobench__model__8f__ui16"
    budgets, kept = {}, {}
    for label, slug in (("namm", "namm"), ("full", "full"), ("h2o@match", "h2o-match")):
        run = run_root / slug
        config = json.loads((run / "config.json").read_text())
        assert config["frames"] == 8 and config["n_questions"] == 6 and config["benchmark"] == "longvideobench"
        rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4"]
        assert "error" in rows[1] and "v1.mp4" in rows[1]["error"] and rows[1]["questions"] == []
        assert rows[1]["question_ids"] == ["v1_0", "v1_1"]
        answered = [q for r in rows for q in r["questions"]]
        assert [q["id"] for q in answered] == ["v0_0", "v0_1", "v2_0", "v2_1"]
        metrics = json.loads((run / "metrics.json").read_text())
        # the runner adds its paired-bootstrap statistics (score, n in units, ci, ...) to what the run saved
        assert {k: results[label][k] for k in metrics if k not in ("score", "n")} == {
            k: v for k, v in metrics.items() if k not in ("score", "n")}
        assert metrics["errors"] == 1 and metrics["error_questions"] == 2 and metrics["n"] == 4
        assert metrics["error_question_ids"] == ["v1_0", "v1_1"]
        budgets[label] = {r["id"]: r.get("budget") for r in rows}
        kept[label] = {r["id"]: r["kept_fraction"] for r in rows}
        assert metrics["acc"] == pytest.approx(np.mean([q["pred"] == q["answer"] for q in answered]))
        assert set(metrics["per_task"]) == {"dur 12", "first", "count"}
        assert rows[0]["context_tokens"] > 8 * 4  # 8 frames x 4 video tokens + prompt + answer
    assert results["full"]["kept_fraction"] == 1.0
    assert 0 < results["namm"]["kept_fraction"] < 1
    # 'match' (batch size 1): h2o's budget on each video is exactly the NAMM's kept fraction measured there
    # (the runner clamps it to [1e-3, 1]); failed videos have neither
    for video_id in ("videos/v0.mp4", "videos/v2.mp4"):
        assert budgets["h2o@match"][video_id] == min(max(kept["namm"][video_id], 1e-3), 1.0)
        assert budgets["namm"][video_id] is None and budgets["full"][video_id] is None
    assert budgets["h2o@match"]["videos/v1.mp4"] is None

    def boom(*a, **k):
        raise AssertionError("finished runs must be reused, not recomputed")

    monkeypatch.setattr(LlavaNextVideoAdapter, "answer_many", boom)
    assert video.run(_args(setup)) == results


def test_bad_inputs(setup):
    with pytest.raises(FileNotFoundError, match="lvb_val.json"):
        video.run(_args(setup, "--data", str(setup / "model")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        video.run(_args(setup, "--model", str(setup / "nothing")))
    with pytest.raises(ValueError, match="--data is required"):
        video.load_items("mlvu", None)
    with pytest.raises(ValueError, match="reads no --data"):
        video.load_items("synthetic", setup / "lvb")
    with pytest.raises(ValueError, match="--split and --tasks"):
        video.load_items("synthetic", None, split="test")
    for bad, match in (("64,x", "integers"), ("32", "outside 64-128"), ("64,200", "outside 64-128")):
        with pytest.raises(ValueError, match=match):
            video.parse_lengths(bad)
    with pytest.raises(ValueError, match="multiple of 5"):
        video.synthetic_items(7)
    with pytest.raises(ValueError, match="unknown policy"):
        video.run(_args(setup, "--policies", "full,lru"))


def test_mlvu_summary_is_the_mean_of_task_accuracies():
    from tasks.video_bench import VideoQAExample

    def ex(i, task, answer):
        return VideoQAExample(f"{task}_{i}", f"video/{task}/{i}.mp4", "q", ["a", "b"], answer, "p", {"task": task})

    items = [video.VideoItem("a", "a.mp4", [ex(0, "count", "A"), ex(1, "count", "B"), ex(2, "count", "A")]),
             video.VideoItem("b", "b.mp4", [ex(0, "needle", "A")]),
             video.VideoItem("c", "c.mp4", [ex(0, "order", "A")])]
    rows = [
        {"id": "a", "kept_fraction": 0.5, "seconds": 1.0,
         "questions": [{"id": "count_0", "pred": "A"}, {"id": "count_1", "pred": "A"}, {"id": "count_2", "pred": "A"}]},
        {"id": "b", "kept_fraction": 0.3, "seconds": 1.0, "questions": [{"id": "needle_0", "pred": "B"}]},
        {"id": "c", "error": "c.mp4: video file not found", "kept_fraction": float("nan"), "seconds": 0.0,
         "questions": []},
    ]
    m = video.summarize("mlvu", items)(rows)
    assert m["per_task"] == {"count": pytest.approx(2 / 3), "needle": 0.0}
    assert m["score"] == m["m_avg"] == pytest.approx(1 / 3) and m["acc"] == pytest.approx(0.5)
    assert m["errors"] == 1 and m["error_questions"] == 1 and m["kept_fraction"] == pytest.approx(0.4)


def test_test_split_with_subtitles_and_official_frames(setup, capsys):
    """lvb_test_wo_gt.json: nothing scored, lmms-eval's submission file, subtitles between the frames."""
    from adapters.llava_next_video import build_prompt
    from tasks.video_io import read_video
    from transfer.policies import make_policy

    args = _args(setup, "--data", str(setup / "lvb_test"), "--split", "test", "--subtitles",
                 "--frame-sampling", "lvb-official", "--policies", "full")
    items = video.load_items("longvideobench", setup / "lvb_test", split="test")
    # 12 frames at 4 fps, annotation 3 s: at most one frame a second, int(12 / 3) * i -> 0, 4, 8 (0, 1, 2 s)
    visual = {i.id: video.subtitle_visual(i, [0.0, 1.0, 2.0], "<video>") for i in items if i.id != "videos/v1.mp4"}
    assert visual == {"videos/v0.mp4": "<video>\nred\n<video>\n<video>\nblue",  # offset 5 s
                      "videos/v2.mp4": "<video>\n<video>\ngreen\n<video>"}
    results = video.run(args)
    out = capsys.readouterr().out
    assert "test split, not scored" in out and "subtitles" in out
    run_root = setup / "runs" / "longvideobench__model__8f__ui16__split-test__subtitles__frame-sampling-lvb-official"
    m = json.loads((run_root / "full" / "metrics.json").read_text())
    assert m["score"] is None and m["acc"] is None and m["n"] == 4 and m["unscored"] is True
    assert results["full"]["score"] is None and results["full"]["submission"] == m["submission"]
    assert m["error_question_ids"] == ["t1_0", "t1_1"]
    rows = [json.loads(line) for line in (run_root / "full" / "predictions.jsonl").read_text().splitlines()]
    assert rows[1]["question_ids"] == ["t1_0", "t1_1"] and "v1.mp4" in rows[1]["error"]
    submission = json.loads((run_root / "submissions" / "full" / "longvideobench_test_for_submission.json").read_text())
    assert m["submission"].endswith("longvideobench_test_for_submission.json")
    assert submission == {q["id"]: q["reply"] for r in rows for q in r["questions"]}
    assert list(submission) == ["t0_0", "t0_1", "t2_0", "t2_1"]
    adapter = LlavaNextVideoAdapter.from_pretrained(str(setup / "model"))
    for row in (rows[0], rows[2]):
        assert row["frame_indices"] == [0, 4, 8]
        assert all(q["answer"] == "" and q["correct"] is None for q in row["questions"])
        item = next(i for i in items if i.id == row["id"])
        clip = read_video(item.video_path, 8, size=56, sampling="lvb-official", duration=3.0)
        replies, _ = adapter.answer_many(adapter.new_memory(make_policy("full"), 16), clip.frames,
                                         [q.prompt for q in item.questions], 4,
                                         prompt_fn=lambda q, v=visual[row["id"]]: build_prompt(q, v))
        assert [q["reply"] for q in row["questions"]] == replies


def test_mlvu_subset(setup, capsys):
    args = _args(setup, "--benchmark", "mlvu", "--data", str(setup / "mlvu"), "--tasks", "count,needle",
                 "--policies", "full")
    results = video.run(args)
    assert "M-Avg over 2 of 7 tasks: needle, count" in capsys.readouterr().out
    run = setup / "runs" / "mlvu__model__8f__ui16__tasks-needle+count" / "full"
    config = json.loads((run / "config.json").read_text())
    assert config["tasks"] == ["needle", "count"] and config["n_questions"] == 4
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    by_task = {}
    for q in (q for r in rows for q in r["questions"]):
        task, i = q["id"].rsplit("_", 1)
        truth = "B" if i == "0" else "C"  # answers green, blue of red/green/blue/white
        by_task.setdefault(task, []).append(q["pred"] == truth)
    assert sorted(by_task) == ["count", "needle"] and all(len(v) == 2 for v in by_task.values())
    m = results["full"]
    assert m["m_avg_tasks"] == ["needle", "count"]
    assert m["score"] == m["m_avg"] == sum(sum(v) / 2 for v in by_task.values()) / 2
    with pytest.raises(FileNotFoundError, match="plotQA.*--tasks"):  # all seven by default
        video.run(_args(setup, "--benchmark", "mlvu", "--data", str(setup / "mlvu"), "--policies", "full"))
    with pytest.raises(ValueError, match="--tasks applies to MLVU only"):
        video.run(_args(setup, "--tasks", "count"))


def test_defaults_are_the_long_model_and_the_test_split():
    """The default model is named (not the first folder found) and the options' defaults are the generated
    test split's (eval/options.py repeats them to stay torch-free)."""
    from tasks import long_video as lv

    assert video.default_model() == video.ROOT / "artifacts" / "video" / "llava-next-video-long"
    config = json.loads((video.default_model() / "config.json").read_text())
    assert config["model_type"] == "llava_next_video" and config["text_config"]["max_position_embeddings"] >= 4608
    p = argparse.ArgumentParser()
    video.add_arguments(p)
    args = p.parse_args([])
    assert args.benchmark == "synthetic" and args.data is None and args.model is None and args.frames is None
    assert args.synthetic_videos == lv.SPLIT_SIZE["test"]
    assert video.parse_lengths(args.synthetic_lengths) == lv.OFFICIAL_FRAMES
    items = video.synthetic_items()
    seeds = [i.synthetic.seed for i in items]
    assert len(items) == 100 and sum(len(i.questions) for i in items) == 500
    assert min(seeds) >= lv.SPLIT_BASE["test"] and len(set(seeds)) == 100  # test seeds, never validation's
    assert {i.synthetic.num_frames for i in items} == set(lv.OFFICIAL_FRAMES)
    letters = [q.answer_letter for i in items for q in i.questions]
    assert {x: letters.count(x) for x in "ABCDE"} == dict.fromkeys("ABCDE", 100)
    assert [i.id for i in video.synthetic_items(limit=3)] == [i.id for i in items[:3]]


def test_shipped_model_on_a_test_slice(tmp_path):
    """`eval video` (default model, generated test set) on 2 quick-set videos: the replies are what HF's own
    generate gives for the same frames and prompts (full cache), the frames are tasks.long_video's, the
    baseline rows are exact, and a 25 % recency cache keeps a quarter."""
    from transformers import LlavaNextVideoForConditionalGeneration

    from adapters.llava_next_video import build_prompt, load_processor
    from tasks import long_video as lv
    from tasks.video_bench import parse_predictions

    p = argparse.ArgumentParser()
    video.add_arguments(p)
    args = p.parse_args(["--synthetic-videos", "5", "--synthetic-lengths", "64", "--frames", "32", "--limit", "2",
                         "--policies", "full,recency@0.25", "--out", str(tmp_path), "--device", "cpu"])
    results = video.run(args)
    run = tmp_path / "synthetic__llava-next-video-long__32f__ui256__synthetic-videos-5__synthetic-lengths-64"
    config = json.loads((run / "full" / "config.json").read_text())
    assert config["n_videos"] == 2 and config["n_questions"] == 10 and config["synthetic_lengths"] == [64]
    rows = [json.loads(line) for line in (run / "full" / "predictions.jsonl").read_text().splitlines()]
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(video.default_model())
    proc = load_processor(video.default_model())
    items = video.synthetic_items(5, (64,), 2)
    correct = []
    for row, item in zip(rows, items):
        idx = lv.sample_frames(64, 32)
        assert row["id"] == item.id and row["frame_indices"] == idx.tolist()
        frames = lv.eval_frames(item.synthetic, idx)
        replies = []
        for q in item.questions:
            enc = proc(text=build_prompt(q.prompt), videos=frames)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=4, do_sample=False)
            replies.append(proc.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
        preds = parse_predictions(item.questions, replies, "longvideobench", 0)
        assert [q["pred"] for q in row["questions"]] == preds
        correct += [x == q.answer_letter for x, q in zip(preds, item.questions)]
    assert results["full"]["score"] == pytest.approx(np.mean(correct)) and results["full"]["n"] == 2
    assert results["full"]["kept_fraction"] == 1.0
    assert results["recency@0.25"]["kept_fraction"] == pytest.approx(0.25, abs=0.02)
    answers = [q.answer_letter for i in items for q in i.questions]
    majority = max(sorted(set(answers)), key=answers.count)
    assert results["chance"]["score"] == pytest.approx(0.2)
    assert results["majority-letter"]["score"] == pytest.approx(np.mean([a == majority for a in answers]))
    assert results["majority-letter"]["delta"] == pytest.approx(results["majority-letter"]["score"] - np.mean(correct))
    assert results["chance"]["per_task"]["dur 64"] == pytest.approx(0.2)


def test_memory_and_sink_lines_follow_the_paired_cis():
    """The report's memory-matters check (full minus recency@0.25) and sink study (namm minus namm-sink) per
    domain: the paired bootstrap's numbers, worded by the CI; a domain without the rows says nothing."""
    from eval.reproduce import SINK, memory_and_sinks
    from transfer.stats import PairedBootstrap

    def units(values):
        return [["", f"v{i // 5}", f"q{i}", float(x)] for i, x in enumerate(values)]

    rng = np.random.default_rng(0)
    full = rng.random(100) < 0.9
    res = {"full": {"units": units(full), "kept_fraction": 1.0},
           "recency@0.25": {"units": units(full & (rng.random(100) < 0.5)), "kept_fraction": 0.25},
           "namm": {"units": units(full), "kept_fraction": 0.5},
           "namm-sink": {"units": units(full), "kept_fraction": 0.5}}
    (line,) = memory_and_sinks({"video": res, "rl": {"full": res["full"]}})
    d = PairedBootstrap({k: [tuple(u) for u in res[k]["units"]] for k in ("full", "recency@0.25")}).diff(
        "full", "recency@0.25")
    assert line.startswith("- **video**: memory matters? full cache minus 25 % recency: ")
    assert f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}], better (kept 100.0/25.0 %, n = 20)" in line
    assert f"first {SINK} tokens: +0.000 [+0.000, +0.000], within noise" in line
