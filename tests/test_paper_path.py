"""The paper path on the CPU: `reproduce --config` over tiny stand-ins in the public layouts (issue 21).

`bench/paper_standins.py --tiny` writes Meta-Llama-3-8B, LLaVA-NeXT-Video-7B-hf and the edbeeching DT
folders exactly as the downloads lay them out (sharded safetensors, dynamic NTK RoPE, a byte-level BPE
with Llama 3's special tokens, a SentencePiece-style tokenizer with <video>, the processor configs, DT
configs without statistics), the benchmark files in LongBench / LongVideoBench layouts, and a config in
eval/configs/paper-gpu.json's format. The end-to-end test runs that config through the CLI, every domain,
every policy of the preset, so the user's path cannot break silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts, not an installed package

from bench import paper_standins as S  # noqa: E402
from eval.reproduce import POLICIES  # noqa: E402


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standins")
    S.write_all(out, tiny=True)
    return out


def test_standins_have_the_public_layouts(standins):
    """The files the real downloads have, with the configuration values the path depends on."""
    from transformers import AutoConfig, AutoTokenizer

    llama = standins / S.LLAMA_DIR
    cfg = json.loads((llama / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0} and cfg["rope_theta"] == 500000.0
    assert cfg["vocab_size"] == S.TINY.llama_bpe_vocab + 256
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the 8B's four files
    tok = AutoTokenizer.from_pretrained(llama)
    bos = S.TINY.llama_bpe_vocab  # 128000 at real size
    assert tok("hello").input_ids[0] == bos == tok.bos_token_id == cfg["bos_token_id"]
    assert tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"]) == [bos + 9, bos + 6]
    assert len(tok) == cfg["vocab_size"]
    text = "Paragraph 3: 段落 ünïcode"  # byte-level: anything round-trips
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"

    llava = standins / S.LLAVA_DIR
    lcfg = AutoConfig.from_pretrained(llava)
    tok = AutoTokenizer.from_pretrained(llava)
    assert tok.convert_tokens_to_ids("<video>") == lcfg.video_token_id and tok("x").input_ids[0] == 1
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                 "chat_template.json"):
        assert (llava / name).is_file(), name
    # the public checkpoints hold transformers-4 names; transformers 5 maps them when loading
    names = json.loads((llava / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.lm_head.weight" in names and "image_newline" in names

    dt = json.loads((standins / "decision-transformer-gym-hopper-medium" / "config.json").read_text())
    assert "state_mean" not in dt and (dt["hidden_size"], dt["n_layer"], dt["max_length"]) == (128, 3, 20)
    rows = [json.loads(x) for x in (standins / "LongBench" / "data" / "passage_retrieval_en.jsonl").open()]
    assert {"input", "context", "answers", "length", "all_classes", "_id"} <= set(rows[0])
    assert (standins / "d4rl" / "hopper-medium-v2.hdf5").is_file()
    assert len(list((standins / "MLVU" / "json").glob("*.json"))) == 7


def test_llava_names_match_save_pretrained(tmp_path):
    """The writer's public weight names are the ones transformers itself writes for this model."""
    from safetensors import safe_open
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    S.write_llava(tmp_path / "m", S.TINY, ["a b c"] * 20)
    cfg = LlavaNextVideoConfig.from_pretrained(tmp_path / "m")
    LlavaNextVideoForConditionalGeneration(cfg).save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        theirs = set(f.keys())
    ours = set(json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"])
    assert ours == theirs


def test_torch_video_processor_resizes_crops_and_counts_tokens(standins):
    """Shortest edge to 56 (bicubic, antialiased), center crop 56x56, CLIP normalisation, 4 tokens a frame."""
    from adapters.llava_next_video import load_processor
    from adapters.torch_video_processor import TorchLlavaNextVideoProcessor

    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision present: transformers' own processor is used")
    except ImportError:
        pass
    proc = load_processor(standins / S.LLAVA_DIR)
    assert isinstance(proc, TorchLlavaNextVideoProcessor) and proc.tokens_per_frame == 4
    frames = np.zeros((3, 64, 114, 3), dtype=np.uint8)
    frames[:, :, 57:] = 255  # right half white: the crop's centre column is where it turns
    enc = proc(text="USER: <video>\nq ASSISTANT:", videos=frames)
    pixel = enc["pixel_values_videos"]
    assert pixel.shape == (1, 3, 3, 56, 56)
    assert int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<video>")).sum()) == 3 * 4
    # 64x114 -> 56x100 (int(56 * 114 / 64) = 99.75 -> 99): crop columns 22..77 of 99; white from 49.5
    expect = torch.nn.functional.interpolate(torch.as_tensor(frames).permute(0, 3, 1, 2).float(), size=(56, 99),
                                             mode="bicubic", antialias=True).clamp(0, 255).round()
    expect = (expect[..., 0:56, 22:78] / 255 - torch.tensor(S.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        S.CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(pixel[0], expect, atol=1e-5)
    assert pixel[0, 0, 0, 0, 0] < 0 < pixel[0, 0, 0, 0, -1]  # black left, white right of the crop


def test_reproduce_config_runs_every_domain_end_to_end(standins, tmp_path):
    """`namm-transfer reproduce --config <stand-in config> --controls 1`: report written, every domain's
    table has every policy of the preset with a CI."""
    from transfer.cli import main

    config = standins / S.CONFIG_NAME
    out = tmp_path / "run"
    assert main(["reproduce", "--config", str(config), "--controls", "1", "--out", str(out)]) == 0
    report = out / "report"
    assert (report / "README.md").is_file() and (report / "cross_domain.md").is_file()
    results = json.loads((report / "results.json").read_text())
    assert set(results) == {"lm", "rl", "video"}
    labels = {"full", "namm", "namm-sink", "namm-random@match", "h2o@match", "l2@match", "namm@0.25", "namm@0.5",
              "namm@0.75", "recency@0.25"}
    assert {p.split("@")[0] for p in POLICIES["quick"].split(",")} == {x.split("@")[0] for x in labels}
    config_values = json.loads(config.read_text())
    for domain in ("lm", "rl", "video"):  # each table states the schedule its domain ran with
        first = (report / f"table_{domain}.md").read_text().splitlines()[0]
        assert f"update every {config_values[domain]['update-interval']} tokens" in first, first
    for domain in ("lm", "rl", "video"):
        assert labels <= set(results[domain]), (domain, sorted(results[domain]))
        table = (report / f"table_{domain}.md").read_text()
        for label in labels:
            row = next((r for r in table.splitlines() if r.startswith(f"| {label} ")), None)
            assert row is not None and "[" in row, (domain, label)  # the score carries its CI
        for label in labels:
            m = results[domain][label]
            assert m["ci"] is not None and m["n"] >= 1, (domain, label)
    lm = results["lm"]["full"]
    assert set(lm["per_task"]) == {"longbench/passage_retrieval_en", "longbench/passage_retrieval_zh"}
    assert results["lm"]["namm"]["kept_fraction"] < 1.0  # the NAMM really evicted under dynamic RoPE
    assert results["video"]["full"]["errors"] == 0  # every video decoded and went through the processor
