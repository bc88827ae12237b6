"""Tiny random HF models for tests, benchmarks and the CPU demo -- no downloads; and the fault
injected by the crash-resume tests (a hook object, since Ray workers import it from the package).

    python -c "from tah.testing import tiny_qwen3; m = tiny_qwen3(); print(sum(p.numel() for p in m.parameters()))"
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def randomize_tah2(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norm scales on a TaH2 model's updater and decider, and a decider score far from p = 0.5
    everywhere (their init makes every token's decision a coin flip at 0.5): routing then mixes depths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (model.updater, model.decider):
            for name, p in mod.named_parameters():
                if name.startswith("norm"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        model.decider.score.weight.copy_(0.5 * torch.randn(model.decider.score.weight.shape, generator=g))


@dataclass(frozen=True)
class FailAfterStep:
    """A train-loop hook (`Hooks.after_checkpoint`, via `jobs.train.run(after_checkpoint=...)`) that
    crashes the worker right after the checkpoint of `step` is reported, as a killed worker would.
    Once only: the marker file records the crash, so the restarted workers resume past it."""

    step: int
    marker: str

    def __call__(self, step: int) -> None:
        if step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"FailAfterStep: simulated crash after step {step}")


def nccl_deepspeed_step(rank: int, world: int, port: int, out_dir: str) -> None:
    """One ZeRO-2 bf16 DeepSpeed step of a tiny TaH model on `world` GPUs over NCCL (the GPU check's
    collective test; spawned, one process per GPU). Writes each rank's loss and a parameter
    checksum to out_dir/rank{r}.json, which must agree across ranks."""
    import json
    import os

    import deepspeed
    import torch.distributed as dist

    from .config import DeciderSettings, LoraSettings, TaHConfig
    from .model import TaHForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig(max_depth=2, lora=LoraSettings(r=4, alpha=8),
                                                                 decider=DeciderSettings(width=32, blocks=2)))
    model.set_trainable("stage1")
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9})
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, 512, (2, 32), generator=g).cuda()
    depths = random_depths(2, 32, 2, hard_fraction=0.3, seed=rank).cuda()
    loss = engine(ids, depths=depths, labels=ids).loss
    engine.backward(loss)
    engine.step()
    total = torch.tensor([loss.item()], device="cuda")
    dist.all_reduce(total)
    checksum = float(sum(p.detach().float().sum() for p in model.parameters()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss_sum": total.item(), "checksum": checksum}, f)
    dist.destroy_process_group()
