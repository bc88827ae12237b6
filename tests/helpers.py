"""Helpers the test modules share (a tiny TaH model beside its HF twin, padded batches); tests import
from here, never from another test file.
"""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path

import torch

from tah import TaHConfig, TaHForCausalLM
from tah.testing import randomize_lora, randomize_tah2, tiny_llama, tiny_qwen3

VENV_BIN = Path(sys.executable).parent  # this venv's `serve`, for tests that run it as a user does

BUILDERS = {"qwen3": tiny_qwen3, "llama": tiny_llama}


def make(arch: str = "qwen3", lora: bool = True, **cfg) -> tuple[TaHForCausalLM, torch.nn.Module]:
    hf = BUILDERS[arch]()
    ref = copy.deepcopy(hf)
    cfg.setdefault("lora", {"r": 4, "alpha": 8, "dropout": 0.0})
    cfg.setdefault("decider", {"width": 32, "blocks": 2, "dropout": 0.0})
    from tah.config import from_dict

    model = TaHForCausalLM.from_backbone(hf, from_dict(TaHConfig, cfg)).eval()
    if lora:
        randomize_lora(model, scale=0.2)
    return model, ref


def batch(B: int = 3, T: int = 14, vocab: int = 300, padding: str = "left", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):  # row 0 full, others padded by a different amount
        n = 2 * b + 1
        if padding == "left":
            mask[b, :n] = 0
        else:
            mask[b, T - n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def make_tah2(max_depth: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **fields) -> TaHForCausalLM:
    """A tiny random TaH2 model (TaHConfig.tah2 + fields) whose routing mixes depths (randomize_tah2);
    in training mode, as a fresh module is (call .eval() for inference)."""
    model = TaHForCausalLM.from_backbone(tiny_qwen3(dtype=dtype), TaHConfig.tah2(max_depth=max_depth, **fields))
    randomize_tah2(model, seed)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (as a server binds it: TIME_WAIT is no conflict)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
