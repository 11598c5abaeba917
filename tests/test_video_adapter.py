"""LLaVA-NeXT-Video under the memory: same logits/answers as HF, eviction == masking, one cache per video."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import Replay, random_namm_theta

from adapters.llava_next_video import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    LlavaNextVideoAdapter,
    TinyVideoProcessor,
    build_prompt,
)
from train.video import build_tokenizer
from transfer.namm import NormStats
from transfer.policies import make_policy
from transfer.policies.namm import NAMMPolicy

SIZE = 56  # 56 px frames, 14 px patches, 2x2 pooling: 4 video tokens per frame
N_FRAMES = 24  # 96 video tokens
QUESTIONS = ["what color was the first object ?", "how many times did a red object appear ?",
             "what color was the big object ?"]


def tiny_llava(tokenizer, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIZE, patch_size=14)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=text, video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", spatial_pool_mode="average", spatial_pool_stride=2,
        image_grid_pinpoints=[[SIZE, SIZE]], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()  # the tiny model's vocabulary (tests may use the trainer; package code may not)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (N_FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def _adapter(tok, seed: int = 0) -> LlavaNextVideoAdapter:
    return LlavaNextVideoAdapter(tiny_llava(tok, seed), TinyVideoProcessor(tok, size=SIZE))


def _policies():
    norm = NormStats(mean=torch.full((17,), 0.01), var=torch.full((17,), 1e-4), count=100)
    return {
        "namm": lambda: NAMMPolicy(random_namm_theta(), norm),
        "h2o": lambda: make_policy("h2o", budget=0.5),
    }


def test_full_cache_equals_hf_forward_and_generate(tok, frames):
    reference = tiny_llava(tok)  # untouched: HF's own attention and mask
    proc = TinyVideoProcessor(tok, size=SIZE)
    enc = proc(text=build_prompt(QUESTIONS[0]), videos=frames)
    assert (enc["input_ids"] == reference.config.video_token_id).sum() == N_FRAMES * 4
    with torch.no_grad():
        ref_logits = reference(**enc).logits[:, -1]
        ref_gen = reference.generate(**enc, max_new_tokens=12, do_sample=False)[:, enc["input_ids"].shape[1]:]
    adapter = _adapter(tok)
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    embeds = adapter.embed(enc["input_ids"], enc["pixel_values_videos"])
    logits = adapter.prefill(memory, embeds, chunk_size=20)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert memory.n_fed == enc["input_ids"].shape[1]
    memory = adapter.new_memory(make_policy("full"), update_interval=32)
    got = adapter.generate(memory, enc["input_ids"], enc["pixel_values_videos"], max_new_tokens=12)
    assert torch.equal(got, ref_gen)
    assert len(set(got[0].tolist())) > 1, "degenerate reference: the random model repeats one token"


@pytest.mark.parametrize("name", list(_policies()))
def test_eviction_equals_masking(tok, frames, name):
    adapter = _adapter(tok)
    enc = adapter.processor(text=build_prompt(QUESTIONS[1]), videos=frames)
    ids, pixel = enc["input_ids"], enc["pixel_values_videos"]
    gather = adapter.new_memory(_policies()[name](), update_interval=32, record=True)
    out_gather = adapter.generate(gather, ids, pixel, max_new_tokens=24)
    emb_last = adapter.language_model.get_input_embeddings()(out_gather[:, -1:]).detach()
    logits_gather = adapter.prefill(gather, emb_last)
    assert sum(gather.cache_tokens()) < len(gather.cache_tokens()) * gather.n_fed, "nothing was evicted"
    masked = adapter.new_memory(Replay(gather.history), update_interval=32, evict="mask")
    out_masked = adapter.generate(masked, ids, pixel, max_new_tokens=24)
    logits_masked = adapter.prefill(masked, emb_last)
    assert torch.equal(out_gather, out_masked)
    assert torch.allclose(logits_gather, logits_masked, atol=1e-5)


@pytest.mark.parametrize("name", list(_policies()))
def test_one_compressed_video_answers_like_fresh_prefills(tok, frames, name):
    """answer_many (video compressed once, restored per question) == a fresh full-prompt run per question."""
    adapter = _adapter(tok)
    memory = adapter.new_memory(_policies()[name](), update_interval=32)
    replies, kept = adapter.answer_many(memory, frames, QUESTIONS, max_new_tokens=8)
    assert len(replies) == len(kept) == len(QUESTIONS)
    for question, reply, k in zip(QUESTIONS, replies, kept):
        fresh = adapter.new_memory(_policies()[name](), update_interval=32)
        alone, alone_kept = adapter.answer_many(fresh, frames, [question], max_new_tokens=8)
        assert alone == [reply] and alone_kept[0] == pytest.approx(k)
        # ... and the same as feeding the whole prompt in one go (no context/question split).
        enc = adapter.processor(text=build_prompt(question), videos=frames)
        whole = adapter.new_memory(_policies()[name](), update_interval=32)
        ids = adapter.generate(whole, enc["input_ids"], enc["pixel_values_videos"], max_new_tokens=8)
        assert tok.batch_decode(ids, skip_special_tokens=True)[0].strip() == reply


def test_kept_fraction_with_budget(tok, frames):
    adapter = _adapter(tok)
    _, kept_full = adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, QUESTIONS[:2], 4)
    assert kept_full == [1.0, 1.0]
    # every layer compressed (skip_layers=()), so the mean kept fraction is the budget itself
    memory = adapter.new_memory(make_policy("l2", budget=0.25, skip_layers=()), update_interval=32)
    _, kept = adapter.answer_many(memory, frames, QUESTIONS[:2], 4)
    assert all(0.2 < k < 0.4 for k in kept)
    assert max(memory.cache_tokens()) < memory.n_fed


def test_round_trip_and_bad_inputs(tok, frames, tmp_path):
    adapter = _adapter(tok)
    adapter.model.save_pretrained(tmp_path / "m")
    adapter.processor.save_pretrained(tmp_path / "m")
    loaded = LlavaNextVideoAdapter.from_pretrained(str(tmp_path / "m"))
    a = adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, QUESTIONS[:1], 6)
    b = loaded.answer_many(loaded.new_memory(make_policy("full"), 32), frames, QUESTIONS[:1], 6)
    assert a == b
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlavaNextVideoAdapter.from_pretrained(str(tmp_path / "missing"))
    enc = adapter.processor(text=build_prompt(QUESTIONS[0]), videos=frames)
    with pytest.raises(ValueError, match="video tokens but the video gives"):
        adapter.embed(enc["input_ids"], enc["pixel_values_videos"][:, :-1])
    with pytest.raises(ValueError, match="exactly one video placeholder"):
        adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, QUESTIONS[:1], 4,
                            prompt_fn=lambda q: q)


# ------------------------------------------------------------------------------------ frames as separate videos
def test_one_placeholder_per_frame_equals_one_video(tok, frames):
    """Per-frame placeholders (the subtitle layout) feed the same features and give the same answers."""
    adapter = _adapter(tok)
    whole = adapter.video_features(adapter.processor(text=VIDEO_TOKEN, videos=frames)["pixel_values_videos"])
    single = adapter.processor(text=VIDEO_TOKEN * N_FRAMES, videos=[frames[i : i + 1] for i in range(N_FRAMES)])
    assert single["pixel_values_videos"].shape == (N_FRAMES, 1, 3, SIZE, SIZE)
    assert torch.allclose(adapter.video_features(single["pixel_values_videos"]), whole, atol=1e-5)
    # the word-level tokenizer drops the newlines between frames, so both prompts hold the same ids
    per_frame = "\n".join([VIDEO_TOKEN] * N_FRAMES)
    a = adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, QUESTIONS[:2], 6)
    b = adapter.answer_many(adapter.new_memory(make_policy("full"), 32), frames, QUESTIONS[:2], 6,
                            prompt_fn=lambda q: build_prompt(q, per_frame))
    assert a[0] == b[0] and a[1] == pytest.approx(b[1])


def test_interleaved_text_sits_between_frames(tok, frames):
    adapter = _adapter(tok)
    visual = "\n".join([VIDEO_TOKEN, "red", VIDEO_TOKEN, VIDEO_TOKEN, "blue green", *[VIDEO_TOKEN] * (N_FRAMES - 3)])
    prompts = [build_prompt(q, visual) for q in QUESTIONS[:2]]
    pixel, ids, split = adapter.encode(frames, prompts)
    assert pixel.shape[:2] == (N_FRAMES, 1)
    vid = adapter.video_token_id
    words = [tok.convert_ids_to_tokens(int(i)) if i != vid else "V" for i in ids[0][0, :split]]
    body = "".join(words[words.index("V"):])  # 4 video tokens per frame, the subtitle words between
    assert body == "VVVV" + "red" + "VVVV" * 2 + "blue" + "green" + "VVVV" * (N_FRAMES - 3)
    assert ids[0][0, split - 1] == vid and ids[1][0, :split].tolist() == ids[0][0, :split].tolist()
    with pytest.raises(ValueError, match="one per frame"):
        adapter.encode(frames, [build_prompt(QUESTIONS[0], VIDEO_TOKEN * 2)])
    with pytest.raises(ValueError, match="the same in every prompt"):
        adapter.encode(frames, [prompts[0], build_prompt(QUESTIONS[1])])


# ------------------------------------------------------------------------------------ processor loading
def _hf_fails(monkeypatch, exc: Exception) -> None:
    import transformers

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(transformers.LlavaNextVideoProcessor, "from_pretrained", boom)


def test_processor_falls_back_only_for_our_tiny_model(tok, tmp_path, monkeypatch, capsys):
    import adapters.llava_next_video as lnv

    TinyVideoProcessor(tok, size=SIZE).save_pretrained(tmp_path / "tiny")
    _hf_fails(monkeypatch, ImportError("LlavaNextVideoVideoProcessor requires the Torchvision library"))
    monkeypatch.setattr(lnv, "_warned_fallback", False)
    first, second = lnv.load_processor(tmp_path / "tiny"), lnv.load_processor(tmp_path / "tiny")
    assert isinstance(first, TinyVideoProcessor) and first.size == SIZE and second.size == SIZE
    assert capsys.readouterr().err.count("warning:") == 1  # once per process, not per load
    # a real checkpoint (subword tokenizer) without torchvision: never the tiny processor; HF's steps in
    # torch from its own files (TorchLlavaNextVideoProcessor, tests/test_paper_path.py), here an error
    # because its tokenizer is broken
    real = tmp_path / "real"
    real.mkdir()
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        (real / name).write_text((tmp_path / "tiny" / name).read_text())
    (real / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(ValueError, match="real: cannot load the tokenizer"):
        lnv.load_processor(real)
    # HF fails for another reason (config drift, a broken file): an error even for the tiny model
    _hf_fails(monkeypatch, ValueError("unrecognised key 'size'"))
    with pytest.raises(ValueError, match="cannot load the LLaVA-NeXT-Video processor .*unrecognised key"):
        lnv.load_processor(tmp_path / "tiny")


@pytest.mark.parametrize("broken", ["{not json", '{"crop_size": {"height": 56}}', "[1, 2]"])
def test_broken_processor_config_fails_loudly(tok, tmp_path, broken):
    """Whatever HF does on this machine (no torchvision: ImportError; else a parse error), a broken
    video processor config is an error naming the folder, not a silently substituted processor."""
    from adapters.llava_next_video import load_processor

    TinyVideoProcessor(tok, size=SIZE).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "video_preprocessor_config.json").write_text(broken)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "m"))):
        load_processor(tmp_path / "m")
