"""What the bench scripts share: the model shapes they run and building random-weight models fast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Llama shapes: a 4-layer toy for the CPU presets and Meta-Llama-3-8B for the GPU presets
LLAMA_CPU_SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


@contextlib.contextmanager
def build_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are initialised directly on the device in dtype: an 8B model in seconds.

    The default dtype is restored afterwards, so buffers made later (the NAMM's) stay fp32.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_llama(config: dict, device: str, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with build_on(device, dtype):
        return LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=131072, **kwargs)).eval()


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
