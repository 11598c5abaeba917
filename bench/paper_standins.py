"""Random-weight stand-ins for the paper path, in the public layouts, and a config that runs them.

    PYTHONPATH=. python bench/paper_standins.py --out /data/standins          # real sizes (GPU machine)
    PYTHONPATH=. python bench/paper_standins.py --out /tmp/standins --tiny   # same layouts, tiny sizes (CPU)
    namm-transfer reproduce --preset full --config /data/standins/paper-standins.json --out runs/rehearsal

`namm-transfer reproduce --config eval/configs/paper-gpu.json` runs Meta-Llama-3-8B on LongBench,
LLaVA-NeXT-Video-7B-hf on LongVideoBench and the public D4RL Decision Transformers. This script writes
folders that look like the user's downloads, with random weights, so that path can run end to end
without them (issue 21):

- `Meta-Llama-3-8B/`: the public config.json values, `rope_scaling` {"rope_type": "dynamic", "factor": 4.0}
  as the NAMM reference evolves and evaluates it, generation_config.json, sharded safetensors with an
  index, and a Llama-3-style byte-level BPE tokenizer trained here (the real special tokens at
  128000-128255, the Llama-3 chat template; the BPE vocabulary padded to 128000 with unreachable tokens).
- `LLaVA-NeXT-Video-7B-hf/`: config.json (Vicuna-7B text config + CLIP ViT-L/14-336, video token 32000,
  image token 32001, 2x2 average pooling), preprocessor_config.json, video_preprocessor_config.json,
  processor_config.json, chat_template.json, shards under the public (pre-transformers-5) weight names,
  and a Llama-2-style tokenizer (Metaspace BPE with byte fallback) with `<video>`/`<image>` added.
- `decision-transformer-gym-{env}-medium/` for hopper, halfcheetah, walker2d: config.json as published
  (no state statistics; hidden 128, 3 layers, 1 head, max_ep_len 1000, max_length 20 = K) and
  model.safetensors. The statistics come from the model card, found from the folder's public name
  (adapters/decision_transformer.py MODEL_CARD_STATS), as for the real download; `d4rl/state_stats/
  {env}.json` (from the hdf5 below) is the `--state-stats` alternative.
- Benchmarks: `LongBench/data/<task>.jsonl` for all 21 LongBench tasks (contexts near 32k tokens of the
  stand-in tokenizer), `LongVideoBench/` (lvb_val.json + videos/, 64-128 frame landscape mp4s drawn with
  tasks/synth_video.py), `MLVU/` (json/<n>_<task>.json + video/<n>_<task>/, the 7 dev tasks),
  `d4rl/{env}-medium-v2.hdf5` (random-action episodes in the D4RL layout).
- `paper-standins.json`: eval/configs/paper-gpu.json with its model and data paths pointed here (and in
  --tiny mode small sizes, CPU and float32).

Weights are written tensor by tensor into shards (at most one shard in memory), from the model's
parameter names and shapes taken on the meta device: the real sizes need about 16 GB + 14 GB of disk
and one shard of RAM, never the whole model. `--tiny` writes the same files with tiny dimensions
(tests/test_paper_path.py runs them on the CPU). The DT checkpoints are small already: both modes write
the public sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "eval" / "configs" / "paper-gpu.json"
ENVS = ("hopper", "halfcheetah", "walker2d")
LLAMA_DIR, LLAVA_DIR = "Meta-Llama-3-8B", "LLaVA-NeXT-Video-7B-hf"
CONFIG_NAME = "paper-standins.json"

# Meta-Llama-3-8B: special tokens after the 128000 BPE tokens (tokenizer_config.json of the public repo).
LLAMA3_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                  7: "<|end_header_id|>", 9: "<|eot_id|>"}
LLAMA3_N_SPECIAL = 256
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# llava-hf/LLaVA-NeXT-Video-7B-hf chat_template.json: USER/ASSISTANT turns, media placeholders first.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Sizes:
    """Everything that differs between the real-size and the tiny stand-ins (the layouts never do)."""

    llama: dict[str, Any]  # LlamaConfig values besides vocab_size
    llama_bpe_vocab: int  # regular (BPE) tokens; the 256 special tokens follow
    llava_text: dict[str, Any]
    llava_vision: dict[str, Any]
    llava_bpe_vocab: int  # regular tokens; <video>, <image> follow
    llava_crop: int  # processor crop (= vision image_size)
    shard_bytes: int
    dtype: str  # of the weights and config torch_dtype (the public files: bfloat16)
    context_tokens: int  # LongBench context length, stand-in tokens
    rows_per_task: int
    video_side: int  # rendered square, padded to 16:9 landscape
    video_frames: tuple[int, ...]  # frame counts of the written videos
    lvb_videos: int
    mlvu_videos_per_task: int
    d4rl_steps: int
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides of paper-gpu.json's values


REAL = Sizes(
    llama=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=8192),
    llama_bpe_vocab=128000,
    llava_text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=4096),
    llava_vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768),
    llava_bpe_vocab=32000, llava_crop=336, shard_bytes=5 * 2**30, dtype="bfloat16", context_tokens=31500,
    rows_per_task=1,
    video_side=336, video_frames=(64, 96, 128), lvb_videos=3, mlvu_videos_per_task=1, d4rl_steps=2000,
    # The rehearsal is paper-gpu.json with smaller n only (it measures per-example costs; docs/paper-path.md
    # scales them to the whole protocol): two LongBench tasks with the shortest and a longer generation
    # (32 and 128 tokens) at ~31.5k-token prompts, one prompt each; 3 videos; 3 episodes per environment.
    config={"lm": {"tasks": "longbench/passage_retrieval_en,longbench/narrativeqa", "limit": 1},
            "video": {"limit": 3}, "rl": {"episodes": 3}},
)
TINY = Sizes(
    # max_position_embeddings 256 < the prompts: the dynamic NTK scaling really rescales, as at 32k on the 8B
    llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256),
    llama_bpe_vocab=1000,
    llava_text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=4096),
    llava_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=14, projection_dim=32),
    llava_bpe_vocab=1000, llava_crop=56, shard_bytes=200_000, dtype="float32", context_tokens=300, rows_per_task=2,
    video_side=64, video_frames=(32, 40), lvb_videos=2, mlvu_videos_per_task=1, d4rl_steps=120,
    config={
        "lm": {"tasks": "longbench/passage_retrieval_en,longbench/passage_retrieval_zh", "limit": 1,
               "update-interval": 64, "batch-size": 2, "device": "cpu"},
        "rl": {"env": "hopper", "episodes": 2, "max-steps": 16, "update-interval": 16, "device": "cpu"},
        "video": {"frames": 8, "limit": 1, "max-new-tokens": 4, "update-interval": 16, "dtype": "float32",
                  "device": "cpu"},
    },
)


# ----------------------------------------------------------------------------------------------- text
def _words(rng: np.random.Generator, n: int) -> list[str]:
    """A fixed pseudo-English lexicon (syllables), so the BPE and the contexts share a distribution."""
    syll = ["ka", "lo", "mi", "ten", "ra", "su", "ve", "dor", "an", "is", "ber", "qu", "el", "ston", "fa", "ri",
            "po", "nel", "th", "ing", "ed", "er", "wa", "gu", "ly", "son", "mar", "ca", "de", "ta"]
    return sorted({"".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(n)})


ZH_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"  # noqa: E501


def _text(rng: np.random.Generator, words: list[str], n_words: int, lang: str = "en") -> str:
    if lang == "zh":
        return "".join(rng.choice(list(ZH_CHARS), n_words)) + "。"
    return " ".join(rng.choice(words, n_words)).capitalize() + "."


def _context(rng: np.random.Generator, words: list[str], tokenizer: Any, tokens: int, lang: str,
             paragraph=None) -> tuple[str, int]:
    """Paragraphs until the context holds about `tokens` stand-in tokens; (text, paragraphs)."""
    parts, count = [], 0
    while count < tokens:
        body = _text(rng, words, int(rng.integers(40, 90)), lang)
        part = paragraph(len(parts), body) if paragraph else body
        parts.append(part)
        count += len(tokenizer(part + "\n\n", add_special_tokens=False).input_ids)
    return "\n\n".join(parts), len(parts)


# ----------------------------------------------------------------------------------------------- tokenizers
def _train_bpe(corpus: list[str], size: int, kind: str) -> dict:
    """A BPE trained here on `corpus`, as tokenizer.json data: byte-level (Llama 3) or Metaspace + byte
    fallback (Llama 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                      limit_alphabet=1000)
    tok.train_from_iterator(corpus, trainer)
    return json.loads(tok.to_str())


def _pad_vocab(data: dict, size: int, filler: str) -> dict:
    """Pad the BPE vocabulary to `size` ids with tokens no merge can produce (the public vocab size)."""
    vocab = data["model"]["vocab"]
    if len(vocab) > size:
        raise ValueError(f"trained vocabulary {len(vocab)} > {size}")
    for i in range(len(vocab), size):
        vocab[filler.format(i)] = i
    return data


def llama3_tokenizer(out: Path, corpus: list[str], bpe_vocab: int) -> Any:
    """Meta-Llama-3-8B's tokenizer files: byte-level BPE (its split regex), the 256 special tokens after the
    regular vocabulary, BOS prepended by the post-processor, the chat template in tokenizer_config.json."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    data = _pad_vocab(_train_bpe(corpus, min(bpe_vocab, 8000), "bytelevel"), bpe_vocab, "ĠĠfiller{}")
    tok = Tokenizer.from_str(json.dumps(data))
    named = [k for k in LLAMA3_SPECIAL if k > 1]  # the reserved tokens are numbered around the named ones
    special = [LLAMA3_SPECIAL.get(i, f"<|reserved_special_token_{i - 2 - sum(k < i for k in named)}|>")
               for i in range(LLAMA3_N_SPECIAL)]
    tok.add_special_tokens(special)
    bos = bpe_vocab
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True,
                                   model_max_length=1000000000000000019884624838656)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out)
    assert fast.convert_tokens_to_ids("<|eot_id|>") == bpe_vocab + 9, "special token ids out of place"
    return fast


def llama2_tokenizer(out: Path, corpus: list[str], bpe_vocab: int) -> Any:
    """LLaVA-NeXT-Video-7B-hf's tokenizer files: Vicuna's (Llama 2) SentencePiece-style BPE with byte fallback,
    <unk>/<s>/</s> = 0/1/2, then <video> = vocab, <image> = vocab + 1; pad is <unk> (text_config pad 0)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    data = _pad_vocab(_train_bpe(corpus, min(bpe_vocab, 8000), "metaspace"), bpe_vocab, "▁▁filler{}")
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_input_names=["input_ids", "attention_mask"],
                                   padding_side="left", model_max_length=4096)
    fast.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    fast.save_pretrained(out)
    assert fast.convert_tokens_to_ids("<video>") == bpe_vocab and fast.convert_tokens_to_ids("<image>") == bpe_vocab + 1
    return fast


# ----------------------------------------------------------------------------------------------- weights
def _init(name: str, shape: tuple[int, ...], gen: Any, dtype: Any) -> Any:
    """Random weights of HF's initialiser's scale: norms 1, biases 0, everything else N(0, 0.02)."""
    import torch

    last = name.rsplit(".", 2)
    if last[-1] == "bias":
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and last[-1] == "weight" or name.endswith("layer_norm1.weight") or "layrnorm" in name:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dtype)


def write_shards(out: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int, dtype: Any, seed: int = 0) -> int:
    """Random tensors of `shapes` into model-0000i-of-0000n.safetensors + model.safetensors.index.json,
    one shard in memory at a time; returns the total bytes."""
    import torch
    from safetensors.torch import save_file

    size = torch.tensor([], dtype=dtype).element_size()
    groups, current, used = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        if current and used + nbytes > shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    groups.append(current)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _init(n, shapes[n], gen, dtype) for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def meta_shapes(model_cls: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def llava_public_name(name: str) -> str:
    """transformers-5 parameter name -> the name in the public (transformers 4) checkpoint files."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"unexpected LLaVA-NeXT-Video parameter {name}")


# ----------------------------------------------------------------------------------------------- models
def write_llama3(out: Path, sizes: Sizes, corpus: list[str]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = llama3_tokenizer(out, corpus, sizes.llama_bpe_vocab)
    vocab = sizes.llama_bpe_vocab + LLAMA3_N_SPECIAL  # 128256
    bos, eos = sizes.llama_bpe_vocab, sizes.llama_bpe_vocab + 1
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu", "initializer_range": 0.02,
        "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": sizes.dtype, "use_cache": True, "vocab_size": vocab,
        **sizes.llama,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")
    import torch

    shapes = meta_shapes(LlamaForCausalLM, LlamaConfig.from_pretrained(out))
    write_shards(out, shapes, sizes.shard_bytes, getattr(torch, sizes.dtype))
    return tok


def write_llava(out: Path, sizes: Sizes, corpus: list[str]) -> Any:
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = llama2_tokenizer(out, corpus, sizes.llava_bpe_vocab)
    video_id, image_id = sizes.llava_bpe_vocab, sizes.llava_bpe_vocab + 1
    vocab = (sizes.llava_bpe_vocab + 2 + 63) // 64 * 64  # 32064, as the public config
    text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 2.5, "type": "linear"},
            "torch_dtype": sizes.dtype, "vocab_size": vocab, **sizes.llava_text}
    vision = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "vocab_size": 32000,
              **sizes.llava_vision}
    side = sizes.llava_crop // sizes.llava_vision["patch_size"]
    config = {
        "architectures": ["LlavaNextVideoForConditionalGeneration"], "ignore_index": -100,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_seq_length": side * side, "image_token_index": image_id, "model_type": "llava_next_video",
        "projector_hidden_act": "gelu", "spatial_pool_mode": "average", "spatial_pool_stride": 2,
        "text_config": text, "tie_word_embeddings": False, "torch_dtype": sizes.dtype,
        "use_image_newline_parameter": True, "video_seq_length": (side // 2) ** 2 * 2, "video_token_index": video_id,
        "vision_config": vision, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    crop = sizes.llava_crop
    image = {"crop_size": {"height": crop, "width": crop}, "do_center_crop": True, "do_convert_rgb": True,
             "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
             "image_grid_pinpoints": config["image_grid_pinpoints"], "image_mean": CLIP_MEAN,
             "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
             "processor_class": "LlavaNextVideoProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
             "size": {"shortest_edge": crop}}
    video = {k: v for k, v in image.items() if k not in ("image_grid_pinpoints", "image_processor_type", "do_pad")}
    video["video_processor_type"] = "LlavaNextVideoVideoProcessor"
    proc = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": sizes.llava_vision["patch_size"],
            "processor_class": "LlavaNextVideoProcessor", "video_token": "<video>",
            "vision_feature_select_strategy": "default"}
    for name, data in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video),
                       ("processor_config.json", proc), ("chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    import torch

    shapes = meta_shapes(LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig.from_pretrained(out))
    write_shards(out, {llava_public_name(k): v for k, v in shapes.items()}, sizes.shard_bytes,
                 getattr(torch, sizes.dtype), seed=1)
    return tok


def write_dt(out: Path, env: str, seed: int) -> None:
    """edbeeching/decision-transformer-gym-<env>-medium as published: config.json without statistics."""
    import torch
    from safetensors.torch import save_file
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    from envs.mujoco import get_spec, make_env

    get_spec(env)
    e = make_env(env)
    state_dim, act_dim = int(e.observation_space.shape[0]), int(e.action_space.shape[0])
    e.close()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "_name_or_path": f"edbeeching/decision-transformer-gym-{env}-medium", "act_dim": act_dim,
        "action_tanh": True, "activation_function": "relu", "architectures": ["DecisionTransformerModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "hidden_size": 128,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_ep_len": 1000, "max_length": 20,
        "model_type": "decision_transformer", "n_head": 1, "n_inner": None, "n_layer": 3, "n_positions": 1024,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True, "state_dim": state_dim, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    model = DecisionTransformerModel(DecisionTransformerConfig.from_pretrained(out))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def write_d4rl(out: Path, env: str, steps: int, seed: int) -> None:
    """`<env>-medium-v2.hdf5` in the D4RL layout (random-action episodes) and its state statistics as
    the `--state-stats` JSON."""
    from envs.d4rl import Episode, write_d4rl_hdf5
    from envs.mujoco import make_env

    e = make_env(env)
    rng = np.random.default_rng(seed)
    episodes, done_steps = [], 0
    while done_steps < steps:
        obs, _ = e.reset(seed=int(rng.integers(2**31)))
        rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
        for t in range(min(200, steps - done_steps)):
            action = rng.uniform(-1, 1, e.action_space.shape).astype(np.float32)
            nxt, r, term, trunc, _ = e.step(action)
            last = t == min(200, steps - done_steps) - 1
            for k, v in zip(rows, (obs, action, r, term, (trunc or last) and not term)):
                rows[k].append(v)
            obs = nxt
            if term:
                break
        episodes.append(Episode(*(np.asarray(rows[k]) for k in rows)))
        done_steps += len(rows["rewards"])
    e.close()
    write_d4rl_hdf5(out / f"{env}-medium-v2.hdf5", episodes, {"source": "bench/paper_standins.py (random actions)"})
    obs = np.concatenate([ep.observations for ep in episodes])
    stats = out / "state_stats"
    stats.mkdir(parents=True, exist_ok=True)
    (stats / f"{env}.json").write_text(json.dumps({"state_mean": obs.mean(0).tolist(),
                                                   "state_std": (obs.std(0) + 1e-6).tolist()}) + "\n")


# ----------------------------------------------------------------------------------------------- benchmarks
ZH_TASKS = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
CODE_TASKS = {"lcc", "repobench-p"}


def longbench_row(task: str, i: int, rng: np.random.Generator, words: list[str], tok: Any, tokens: int) -> dict:
    """One row of LongBench's data/<task>.jsonl with a context of about `tokens` tokens."""
    lang = "zh" if task in ZH_TASKS else "en"
    answers, classes, para = None, None, None
    if task.startswith("passage_retrieval"):
        label = "段落{}：" if lang == "zh" else "Paragraph {}: "
        para = lambda k, body: label.format(k + 1) + body  # noqa: E731
    elif task in ("trec", "lsht"):
        classes = [f"{w}" for w in rng.choice(words, 6, replace=False)]
        para = lambda k, body: f"Question: {body}\nType: {classes[k % len(classes)]}"  # noqa: E731
    elif task in CODE_TASKS:
        para = lambda k, body: f"def f_{k}(x):\n    return x + {k}  # {body[:40]}"  # noqa: E731
    context, n = _context(rng, words, tok, tokens, lang, para)
    if task.startswith("passage_retrieval"):
        k = int(rng.integers(1, n + 1))
        answers = [f"段落{k}" if lang == "zh" else f"Paragraph {k}"]
    elif task == "passage_count":
        answers = [str(n)]
    elif classes:
        answers = [str(rng.choice(classes))]
    elif task in CODE_TASKS:
        answers = [f"    return x + {n}"]
    else:
        answers = [_text(rng, words, 3, lang)]
    question = _text(rng, words, 12, lang) + ("" if lang == "zh" else "?")
    return {"input": question if task not in CODE_TASKS else "def g(x):", "context": context, "answers": answers,
            "length": len(context) if lang == "zh" else len(context.split()), "dataset": task, "language": lang,
            "all_classes": classes, "_id": f"standin-{task}-{i:04d}"}


def write_longbench(out: Path, sizes: Sizes, tok: Any, words: list[str], tasks: list[str]) -> None:
    from tasks.longbench import LONGBENCH_TASKS

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for t, task in enumerate(tasks or LONGBENCH_TASKS):
        rng = np.random.default_rng(100 + t)
        rows = [longbench_row(task, i, rng, words, tok, sizes.context_tokens) for i in range(sizes.rows_per_task)]
        (data / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _landscape(frames: np.ndarray) -> np.ndarray:
    """Pad square frames to 16:9 (even width) with the background: real videos are not square, so the
    processor's shortest-edge resize and center crop do real work."""
    from tasks.synth_video import BACKGROUND

    h = frames.shape[1]
    extra = (int(round(h * 16 / 9)) // 2 * 2) - frames.shape[2]
    out = np.empty((frames.shape[0], h, frames.shape[2] + extra, 3), dtype=np.uint8)
    out[:] = np.asarray(BACKGROUND, dtype=np.uint8)
    out[:, :, extra // 2 : extra // 2 + frames.shape[2]] = frames
    return out


def _video(path: Path, spec: Any, side: int) -> float:
    """tasks/synth_video.py's video drawn at its size, scaled to `side` rows, padded to 16:9, as mp4."""
    from adapters.llava_next_video import resize_frames
    from tasks.synth_video import FPS, render
    from tasks.video_io import write_mp4

    write_mp4(path, _landscape(resize_frames(render([spec])[0].numpy(), side)), fps=FPS)
    return spec.num_frames / FPS


def _spec(rng: np.random.Generator, frames: int, side: int) -> Any:
    from tasks.synth_video import sample_spec

    return sample_spec(rng, frames)


def write_lvb(out: Path, sizes: Sizes, seed: int = 7) -> None:
    """LongVideoBench: lvb_val.json (its fields) + videos/<id>.mp4."""
    from tasks.synth_video import make_questions

    rng = np.random.default_rng(seed)
    records = []
    for v in range(sizes.lvb_videos):
        spec = _spec(rng, sizes.video_frames[v % len(sizes.video_frames)], sizes.video_side)
        vid = f"standin{v:04d}"
        duration = _video(out / "videos" / f"{vid}.mp4", spec, sizes.video_side)
        for q, qa in enumerate(make_questions(spec, rng)):
            records.append({"video_id": vid, "id": f"{vid}_{q}", "video_path": f"{vid}.mp4", "duration": duration,
                            "duration_group": 15 if duration <= 15 else 60,
                            "question_category": qa["question_category"],
                            "question": qa["question"], "candidates": qa["candidates"],
                            "correct_choice": qa["correct_choice"], "position": [], "level": "L1-Perception",
                            "subtitle_path": f"{vid}_en.json", "starting_timestamp_for_subtitles": 0})
        (out / "subtitles").mkdir(parents=True, exist_ok=True)
        (out / "subtitles" / f"{vid}_en.json").write_text(json.dumps(
            [{"start": "00:00:00.500", "end": "00:00:02.000", "line": "a disc drifts by"}]) + "\n")
    (out / "lvb_val.json").write_text(json.dumps(records, indent=1) + "\n")


def write_mlvu(out: Path, sizes: Sizes, seed: int = 8) -> None:
    """MLVU dev: json/<n>_<task>.json + video/<n>_<task>/<name>.mp4, 4 candidates, the answer as text."""
    from tasks.synth_video import COLORS, make_questions
    from tasks.video_bench import MLVU_DEV_TASKS

    rng = np.random.default_rng(seed)
    (out / "json").mkdir(parents=True, exist_ok=True)
    for n, task in enumerate(MLVU_DEV_TASKS, 1):
        stem, records = f"{n}_{task}", []
        for v in range(sizes.mlvu_videos_per_task):
            spec = _spec(rng, sizes.video_frames[v % len(sizes.video_frames)], sizes.video_side)
            name = f"{task}_{v}.mp4"
            duration = _video(out / "video" / stem / name, spec, sizes.video_side)
            qa = make_questions(spec, rng)[0]  # the first object's colour
            truth = qa["candidates"][qa["correct_choice"]]
            others = [c for c in COLORS if c != truth]
            cands = list(rng.permutation([truth, *rng.choice(others, 3, replace=False)]))
            records.append({"video": name, "duration": duration, "question": qa["question"],
                            "candidates": [str(c) for c in cands], "answer": truth, "question_type": task})
        (out / "json" / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------- config
def standin_config(out: Path, sizes: Sizes) -> dict[str, Any]:
    """eval/configs/paper-gpu.json with its models and data pointed at the stand-ins (same keys, same
    meaning), plus the size-dependent overrides."""
    config = json.loads(PAPER_CONFIG.read_text())
    config["_about"] = (f"Written by bench/paper_standins.py{' --tiny' if sizes is TINY else ''}: "
                        f"{PAPER_CONFIG.relative_to(ROOT)} with random-weight stand-ins in the public layouts.")
    config["lm"].update(model=str(out / LLAMA_DIR), data=str(out / "LongBench"))
    config["rl"].update(model=str(out / "decision-transformer-gym-{env}-medium"))
    config["video"].update(model=str(out / LLAVA_DIR), data=str(out / "LongVideoBench"))
    for domain, values in sizes.config.items():
        config[domain].update(values)
    return config


def corpus_for(words: list[str], rng: np.random.Generator) -> list[str]:
    """What the stand-in BPEs are trained on: the contexts' lexicon, Chinese, code, the prompts' words."""
    from tasks.longbench import DATASET2PROMPT

    lines = [_text(rng, words, 60) for _ in range(1500)] + [_text(rng, words, 80, "zh") for _ in range(300)]
    lines += [f"def f_{k}(x):\n    return x + {k}" for k in range(200)] + list(DATASET2PROMPT.values())
    return lines


def write_all(out: str | Path, tiny: bool = False, parts: tuple[str, ...] = ("lm", "rl", "video")) -> Path:
    """Every stand-in under `out` and the config; returns the config's path."""
    out = Path(out)
    sizes = TINY if tiny else REAL
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = _words(rng, 3000)
    corpus = corpus_for(words, rng)
    t0 = time.time()
    if "lm" in parts:
        tok = write_llama3(out / LLAMA_DIR, sizes, corpus)
        tasks = [t.split("/", 1)[1] for t in sizes.config.get("lm", {}).get("tasks", "").split(",") if t]
        write_longbench(out / "LongBench", sizes, tok, words, tasks)
        print(f"lm stand-ins written ({time.time() - t0:.0f} s)", flush=True)
    if "rl" in parts:
        for i, env in enumerate(ENVS):
            write_dt(out / f"decision-transformer-gym-{env}-medium", env, seed=i)
            write_d4rl(out / "d4rl", env, sizes.d4rl_steps, seed=i)
        print(f"rl stand-ins written ({time.time() - t0:.0f} s)", flush=True)
    if "video" in parts:
        write_llava(out / LLAVA_DIR, sizes, corpus)
        for name, writer in (("LongVideoBench", write_lvb), ("MLVU", write_mlvu)):
            if (out / name).exists():
                shutil.rmtree(out / name)
            writer(out / name, sizes)
        print(f"video stand-ins written ({time.time() - t0:.0f} s)", flush=True)
    path = out / CONFIG_NAME
    path.write_text(json.dumps(standin_config(out, sizes), indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the stand-ins and paper-standins.json")
    p.add_argument("--tiny", action="store_true", help="the same layouts with tiny dimensions (CPU tests)")
    p.add_argument("--parts", default="lm,rl,video", help="comma-separated subset of lm,rl,video")
    args = p.parse_args(argv)
    parts = tuple(x.strip() for x in args.parts.split(","))
    if set(parts) - {"lm", "rl", "video"}:
        p.error(f"--parts: unknown {sorted(set(parts) - {'lm', 'rl', 'video'})}; use lm, rl, video")
    path = write_all(args.out, args.tiny, parts)
    print(f"config: {path}")


if __name__ == "__main__":
    main()
