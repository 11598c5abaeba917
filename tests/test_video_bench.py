"""LongVideoBench / MLVU loaders, lmms-eval prompts and parsers, metrics, synthetic set determinism."""

import json
import random

import numpy as np
import pytest

from tasks.video_bench import (
    LVB_POST_PROMPT,
    MLVU_DEV_TASKS,
    extract_mlvu_answer,
    fallback_rng,
    group_by_video,
    interleave_subtitles,
    load_longvideobench,
    load_mlvu_dev,
    load_subtitles,
    lvb_metrics,
    lvb_prompt,
    lvb_submission,
    mlvu_metrics,
    parse_mlvu_tasks,
    parse_multi_choice_response,
    parse_predictions,
)


def write_lvb(root, rows):
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "lvb_val.json").write_text(json.dumps(rows))
    return root


LVB_ROWS = [
    {"id": "q0", "video_path": "v0.mp4", "question": "What is red?", "candidates": ["a cat", "a car", "a hat", "a bat"],
     "correct_choice": 1, "duration_group": 15, "question_category": "S2E", "duration": 12.5},
    {"id": "q1", "video_path": "v0.mp4", "question": "Who?", "option0": "x", "option1": "y", "option2": "z",
     "option3": "w", "option4": "N/A", "correct_choice": 3, "duration_group": 600, "question_category": "E2O"},
    {"id": "q2", "video_path": "v1.mp4", "question": "When?", "candidates": ["1", "2", "3", "4", "5"],
     "correct_choice": 4, "duration_group": 15, "question_category": "E2O"},
]


def test_lvb_prompt_exact():
    want = "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.\n"
    assert lvb_prompt("Q?", ["x", "y"]) == want
    assert LVB_POST_PROMPT.endswith("directly.\n")


def test_load_longvideobench(tmp_path):
    ex = load_longvideobench(write_lvb(tmp_path, LVB_ROWS))
    assert [e.answer_letter for e in ex] == ["B", "D", "E"]
    assert ex[1].options == ["x", "y", "z", "w"]  # "N/A" dropped
    assert ex[1].prompt == "Who?\nA. x\nB. y\nC. z\nD. w\n" + LVB_POST_PROMPT
    assert ex[0].video_path == str(tmp_path / "videos" / "v0.mp4")
    assert ex[0].groups == {"duration_group": "15", "question_category": "S2E"} and ex[0].duration == 12.5
    assert [len(v) for v in group_by_video(ex).values()] == [2, 1]


def test_lvb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load_longvideobench(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="lvb_val.json"):
        load_longvideobench(tmp_path)
    write_lvb(tmp_path, [{**LVB_ROWS[0], "correct_choice": 7}])
    with pytest.raises(ValueError, match="correct_choice 7"):
        load_longvideobench(tmp_path)
    write_lvb(tmp_path, [{"question": "q"}])
    with pytest.raises(ValueError, match="lacks video_path, correct_choice"):
        load_longvideobench(tmp_path)
    (tmp_path / "lvb_val.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid annotation json, not valid JSON"):
        load_longvideobench(tmp_path)


@pytest.mark.parametrize(
    "reply,letter",
    [("B", "B"), ("The best answer is C.", "C"), ("Best option: (D) a hat", "D"), ("(A)", "A"),
     ("D. A book", "D"), ("  E\n", "E"), ("The answer is B because", "B")],
)
def test_parse_multi_choice(reply, letter):
    assert parse_multi_choice_response(reply, list("ABCDE"), random.Random(0)) == letter


def test_parse_random_fallback_is_seeded():
    choices = list("ABCD")
    long_reply = "i really do not know which one of these options is the right one here"
    for reply in ["no idea", long_reply, ""]:
        picks = {parse_multi_choice_response(reply, choices, fallback_rng(3, "q7")) for _ in range(5)}
        assert len(picks) == 1 and picks <= set(choices)
    # different example ids draw independently: over many ids every letter shows up
    assert {parse_multi_choice_response("?", choices, fallback_rng(0, str(i))) for i in range(60)} == set(choices)
    # a long reply with an option letter is still parsed, not randomised
    assert parse_multi_choice_response(long_reply + " C", choices, random.Random(0)) == "C"


def test_lvb_metrics(tmp_path):
    ex = load_longvideobench(write_lvb(tmp_path, LVB_ROWS))
    letters = parse_predictions(ex, ["B", "The best answer is A", "E"], "longvideobench", seed=0)
    assert letters == ["B", "A", "E"]
    m = lvb_metrics(ex, letters)
    assert m["acc"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["by_duration_group"] == {"15": 1.0, "600": 0.0}
    assert m["by_question_category"] == {"E2O": 0.5, "S2E": 1.0}
    with pytest.raises(ValueError):
        parse_predictions(ex, ["A"], "longvideobench")
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_predictions(ex, ["A"] * 3, "videomme")


def write_mlvu(root):
    (root / "json").mkdir(parents=True)
    tasks = {"1_plotQA": [("what?", ["p", "q", "r", "s"], "q"), ("why?", ["p", "q", "r", "s"], "s")],
             "4_count": [("how many?", ["1", "2", "3", "4"], "3")]}
    for stem, rows in tasks.items():
        recs = [{"video": f"{stem}_{i}.mp4", "duration": 100, "question": q, "candidates": c, "answer": a,
                 "question_type": stem[2:]} for i, (q, c, a) in enumerate(rows)]
        (root / "json" / f"{stem}.json").write_text(json.dumps(recs))
    return root


def test_mlvu_loader_prompt_metrics(tmp_path):
    root = write_mlvu(tmp_path)
    ex = load_mlvu_dev(root, tasks=("plotQA", "count"))
    assert [e.answer_letter for e in ex] == ["B", "D", "C"]
    assert ex[0].prompt == "what?\n(A) p\n(B) q\n(C) r\n(D) s\nOnly give the best option.\nBest option: ("
    assert ex[2].video_path == str(root / "video" / "4_count" / "4_count_0.mp4")
    letters = parse_predictions(ex, ["B) q", "nothing useful", "C"], "mlvu")
    assert letters == ["B", "", "C"]
    m = mlvu_metrics(ex, letters)
    assert m["by_task"] == {"count": 1.0, "plotQA": 0.5}
    assert m["m_avg"] == pytest.approx(0.75) and m["acc"] == pytest.approx(2 / 3)  # macro != micro
    with pytest.raises(FileNotFoundError, match="ego"):
        load_mlvu_dev(root, tasks=("ego",))
    with pytest.raises(FileNotFoundError, match="json directory"):
        load_mlvu_dev(tmp_path / "nothing")


def test_mlvu_extraction():
    assert extract_mlvu_answer("A) a cat", 4) == "A"
    assert extract_mlvu_answer("E", 4) == ""  # letter outside the option range
    assert extract_mlvu_answer("F", 6) == "F"  # MLVU test has 6 options
    assert extract_mlvu_answer("Best option: (C)", 4) == "C"


def test_synthetic_set_is_deterministic_and_loadable(tmp_path):
    pytest.importorskip("av")
    from tasks.synth_video import QUESTION_TYPES, generate_lvb, render, sample_dataset

    a, b = sample_dataset(4, seed=11), sample_dataset(4, seed=11)
    assert [x[0] for x in a] == [x[0] for x in b] and [x[1] for x in a] == [x[1] for x in b]
    assert [x[0] for x in sample_dataset(4, seed=12)] != [x[0] for x in a]
    out = generate_lvb(tmp_path / "s", n_videos=3, seed=11)
    ex = load_longvideobench(out)
    assert len(ex) == 12 and {e.groups["question_category"] for e in ex} == set(QUESTION_TYPES)
    assert all(len(e.options) == 5 for e in ex)
    again = generate_lvb(tmp_path / "s2", n_videos=3, seed=11)
    assert (out / "lvb_val.json").read_text() == (again / "lvb_val.json").read_text()
    with pytest.raises(FileExistsError):
        generate_lvb(out, n_videos=3, seed=11)
    # answers are true to the rendered pixels: first frame shows the first colour, count matches scenes
    spec, questions = sample_dataset(1, seed=11)[0]
    frames = render([spec]).numpy()[0]  # (F, H, W, 3)
    from tasks.synth_video import BACKGROUND, COLORS, PALETTE

    def colour_of(frame):
        px = frame.reshape(-1, 3)
        obj = px[(px != np.array(BACKGROUND)).any(1)]
        return COLORS[[tuple(v) for v in PALETTE.values()].index(tuple(obj[0]))]

    first = questions[0]
    assert colour_of(frames[0]) == first["candidates"][first["correct_choice"]]
    scene_colours = [colour_of(frames[s]) for s in spec.starts]
    assert scene_colours.count(COLORS[spec.count_color]) == spec.count == questions[3]["correct_choice"] + 1
    areas = [((frames[s] != np.array(BACKGROUND)).any(-1)).sum() for s in spec.starts]
    assert int(np.argmax(areas)) == spec.big


# ------------------------------------------------------------------------------------------ test split
def test_lvb_test_split_has_no_answers(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "correct_choice"} for r in LVB_ROWS]
    rows[0].update(subtitle_path="v0_en.json", starting_timestamp_for_subtitles=12.5)
    (tmp_path / "lvb_test_wo_gt.json").write_text(json.dumps(rows))
    ex = load_longvideobench(tmp_path, split="test")
    assert [e.id for e in ex] == ["q0", "q1", "q2"] and [e.answer_letter for e in ex] == ["", "", ""]
    assert ex[1].prompt == "Who?\nA. x\nB. y\nC. z\nD. w\n" + LVB_POST_PROMPT
    assert ex[0].subtitle_path == str(tmp_path / "subtitles" / "v0_en.json") and ex[0].subtitle_offset == 12.5
    assert ex[1].subtitle_path is None and ex[1].subtitle_offset is None
    with pytest.raises(FileNotFoundError, match="lvb_val.json"):  # the val split still needs its own file
        load_longvideobench(tmp_path)
    with pytest.raises(ValueError, match="unknown LongVideoBench split"):
        load_longvideobench(tmp_path, split="dev")
    # lmms-eval's submission: {id: raw reply}
    assert lvb_submission(["q0", "q1"], ["B", "The answer is C"]) == {"q0": "B", "q1": "The answer is C"}
    with pytest.raises(ValueError, match="one reply per distinct question id"):
        lvb_submission(["q0", "q0"], ["B", "C"])


# ------------------------------------------------------------------------------------------- subtitles
# Frames at 0, 1, 2, 3, 4 s (the official rule on a 5 s clip at 8 fps); subtitles come from the full
# video, 10 s earlier than the clip (starting_timestamp_for_subtitles = 10).
FRAME_TIMES = [0.0, 1.0, 2.0, 3.0, 4.0]
SUBS_SECONDS = [
    {"timestamp": [10.2, 11.4], "text": "alpha"},  # mid 0.8: after frame 0; frame 1.0 inside -> kept
    {"timestamp": [11.9, 12.1], "text": "beta"},  # mid 2.0: frames 1, 2 first; < 1 s, widened to 1.5-2.5
    {"timestamp": [12.3, 12.6], "text": "gamma"},  # mid 2.45: no new frame; widened 1.95-2.95 holds 2.0
    {"timestamp": [13.0, 14.0], "text": "delta"},  # mid 3.5: frame 3 first; (3, 4) holds no frame: dropped
]
SUBS_CLOCK = [{"start": f"00:00:{a:06.3f}", "end": f"00:00:{b:06.3f}", "line": s["text"]}
              for s in SUBS_SECONDS for a, b in [s["timestamp"]]]


@pytest.mark.parametrize("subs", [SUBS_SECONDS, SUBS_CLOCK], ids=["timestamp-text", "start-end-line"])
def test_interleave_follows_the_official_loader(tmp_path, subs):
    (tmp_path / "s.json").write_text(json.dumps(subs))
    loaded = load_subtitles(tmp_path / "s.json")
    order = interleave_subtitles(FRAME_TIMES, loaded, 10.0, 5.0)
    assert order == [0, "alpha", 1, 2, "beta", "gamma", 3, 4]
    # without the offset every subtitle lies after the clip: all frames, then no text covers a frame
    assert interleave_subtitles(FRAME_TIMES, loaded, 0.0, 5.0) == [0, 1, 2, 3, 4]


def test_interleave_null_end_and_offset():
    # A null end means "to the end of the video" (duration), shifted by the offset like every time.
    open_end = [{"timestamp": [2.2, None], "text": "tail"}]  # offset 0: span 2.2-5.0, mid 3.6
    assert interleave_subtitles(FRAME_TIMES, open_end, 0.0, 5.0) == [0, 1, 2, 3, "tail", 4]
    # with an offset the official code subtracts it from the duration as well (end = 5 - 10 = -5): the
    # span collapses to its midpoint, (12.2 - 10 - 5) / 2 = -1.4, and no frame lies within +- 0.5 s of it
    shifted = [{"timestamp": [12.2, None], "text": "tail"}]
    assert interleave_subtitles(FRAME_TIMES, shifted, 10.0, 5.0) == [0, 1, 2, 3, 4]
    # an integer end counts as "not a float" in the official code, exactly like null
    # (read as 3 s it would give [0, 1, 2, "t", 3, 4])
    assert interleave_subtitles(FRAME_TIMES, [{"timestamp": [2.2, 3], "text": "t"}], 0.0, 5.0) == [0, 1, 2, 3, "t", 4]


def test_bad_subtitle_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="subtitle file not found"):
        load_subtitles(tmp_path / "none.json")
    (tmp_path / "a.json").write_text(json.dumps([{"timestamp": [1.0, 2.0]}]))
    with pytest.raises(ValueError, match="subtitle 0 is neither"):
        load_subtitles(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="invalid subtitle file, expected a JSON list, got dict"):
        load_subtitles(tmp_path / "b.json")
    with pytest.raises(ValueError, match="bad subtitle timestamp"):
        interleave_subtitles(FRAME_TIMES, [{"start": "1.5", "end": "00:00:02.0", "line": "x"}], 0.0, 5.0)


# ------------------------------------------------------------------------------------------ MLVU subset
def test_mlvu_task_selection(tmp_path):
    assert parse_mlvu_tasks(None) == parse_mlvu_tasks("") == MLVU_DEV_TASKS
    assert parse_mlvu_tasks("count, plotQA") == ("plotQA", "count")  # the benchmark's order
    with pytest.raises(ValueError, match="unknown MLVU task.*counting.*choose from: plotQA"):
        parse_mlvu_tasks("count,counting")
    root = write_mlvu(tmp_path)
    ex = load_mlvu_dev(root, tasks=parse_mlvu_tasks("count"))
    assert [e.id for e in ex] == ["count_0"]
    m = mlvu_metrics(ex, ["C"])
    assert m["m_avg_tasks"] == ["count"] and m["m_avg"] == 1.0
    with pytest.raises(FileNotFoundError, match="MLVU task 'needle'.*--tasks"):
        load_mlvu_dev(root)  # all seven by default; this folder holds two
