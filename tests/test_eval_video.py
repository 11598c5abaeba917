"""`namm-transfer eval video` end to end on a tiny random model and mp4s in the LongVideoBench layout."""

from __future__ import annotations

import argparse
import json

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
    assert list(results) == ["namm", "full", "h2o@match"]
    out = capsys.readouterr().out
    assert "h2o@match" in out and "could not be read" in out
    run_root = setup / "runs" / "longvideobench__model__8f__ui16"
    for label, slug in (("namm", "namm"), ("full", "full"), ("h2o@match", "h2o-match")):
        run = run_root / slug
        config = json.loads((run / "config.json").read_text())
        assert config["frames"] == 8 and config["n_questions"] == 6 and config["benchmark"] == "longvideobench"
        rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4"]
        assert "error" in rows[1] and "v1.mp4" in rows[1]["error"] and rows[1]["questions"] == []
        answered = [q for r in rows for q in r["questions"]]
        assert [q["id"] for q in answered] == ["v0_0", "v0_1", "v2_0", "v2_1"]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics == results[label]
        assert metrics["errors"] == 1 and metrics["error_questions"] == 2 and metrics["n"] == 4
        assert metrics["acc"] == pytest.approx(np.mean([q["pred"] == q["answer"] for q in answered]))
        assert set(metrics["per_task"]) == {"dur 12", "first", "count"}
        assert rows[0]["context_tokens"] > 8 * 4  # 8 frames x 4 video tokens + prompt + answer
    assert results["full"]["kept_fraction"] == 1.0
    assert 0 < results["namm"]["kept_fraction"] < 1
    # 'match': h2o's budget on each video is the NAMM's kept fraction there
    assert results["h2o@match"]["kept_fraction"] == pytest.approx(results["namm"]["kept_fraction"], abs=0.1)

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
        video.default_data("mlvu")
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
