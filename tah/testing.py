"""Tiny random HF models for tests, benchmarks and the CPU demo -- no downloads.

    python -c "from tah.testing import tiny_qwen3; m = tiny_qwen3(); print(sum(p.numel() for p in m.parameters()))"
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
               num_kv_heads: int = 2, head_dim: int = 16, intermediate_size: int = 128, seed: int = 0,
               tie_word_embeddings: bool = True, initializer_range: float = 0.1,
               attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 (GQA, q/k-norm, tied embeddings like Qwen3-0.6B/1.7B)."""
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=4096,
                      tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range,
                      attn_implementation=attn_implementation, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).to(dtype).eval()


def tiny_llama(vocab_size: int = 384, hidden_size: int = 48, num_layers: int = 3, num_heads: int = 6,
               num_kv_heads: int = 3, intermediate_size: int = 96, seed: int = 0, initializer_range: float = 0.1,
               attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised Llama-family model (untied embeddings, GQA, no q/k-norm)."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, initializer_range=initializer_range,
                      attn_implementation=attn_implementation, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def random_depths(batch: int, seqlen: int, max_depth: int, hard_fraction: float = 0.3,
                  seed: int = 0) -> torch.Tensor:
    """(B, T) depths: each token 1 w.p. 1 - hard_fraction, else uniform in 2..max_depth."""
    g = torch.Generator().manual_seed(seed)
    hard = torch.rand(batch, seqlen, generator=g) < hard_fraction
    deep = torch.randint(2, max(max_depth, 2) + 1, (batch, seqlen), generator=g)
    return torch.where(hard & (max_depth > 1), deep, torch.ones_like(deep))


def randomize_lora(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA B matrix random values (peft inits B = 0, which makes the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
