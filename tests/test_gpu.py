"""What only a CUDA GPU can show: every attention backend in bf16 forward/backward against the
reference, FlexAttention backward, flash-attn kernels, a 2-GPU NCCL DeepSpeed step, the engine
against HF `generate` on the GPU.

Skipped without CUDA; `make gpu-check` runs these and the GPU benchmarks on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

from tah.attention import flash_attn_available
from tah.testing import random_depths

from .helpers import batch, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BACKENDS = ["sdpa", "flex", "auto"] + (["flash"] if flash_attn_available() else [])


def _run(backend: str, dtype: torch.dtype, ids, mask, depths):
    model, _ = make(max_depth=3, attn_backend=backend)
    model.cuda().to(dtype)
    out = model(ids.cuda(), attention_mask=mask.cuda(), depths=depths.cuda(), labels=ids.cuda())
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_backends_equal_reference_with_grads(backend):
    ids, mask = batch(B=3, T=40, padding="left", seed=1)
    depths = random_depths(3, 40, 3, hard_fraction=0.3, seed=2)
    ref, got = _run("reference", torch.float32, ids, mask, depths), _run(backend, torch.float32, ids, mask, depths)
    v = mask.bool().cuda()
    assert (got[0] - ref[0])[v].abs().max() <= 1e-4
    for n, g in ref[1].items():
        assert torch.allclose(got[1][n], g, atol=1e-4, rtol=1e-3), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_backends_track_the_fp32_reference(backend):
    """bf16 forward and backward of each backend stay within bf16 noise of the fp32 reference: the
    same relative error as the bf16 reference backend itself (a wrong mask is far outside it)."""
    ids, mask = batch(B=3, T=64, padding="left", seed=5)
    depths = random_depths(3, 64, 3, hard_fraction=0.3, seed=6)
    exact = _run("reference", torch.float32, ids, mask, depths)
    ref16, got16 = _run("reference", torch.bfloat16, ids, mask, depths), _run(backend, torch.bfloat16, ids, mask, depths)
    v = mask.bool().cuda()

    def err(a, b):
        return ((a - b)[v].norm() / b[v].norm()).item()

    assert err(got16[0], exact[0]) <= 2 * err(ref16[0], exact[0]) + 1e-3
    for n, g in exact[1].items():
        e_ref = (ref16[1][n] - g).norm() / (g.norm() + 1e-12)
        assert (got16[1][n] - g).norm() / (g.norm() + 1e-12) <= 2 * e_ref + 2e-2, n


def test_bf16_decode_matches_parallel():
    model, _ = make(max_depth=2)
    model.cuda().to(torch.bfloat16)
    ids, mask = batch(B=2, T=16, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    depths = random_depths(2, 16, 2, hard_fraction=0.3, seed=4).cuda()
    with torch.no_grad():
        par = model(ids, attention_mask=mask, depths=depths).logits.float()
        cache = model.new_cache(2)
        seq = torch.stack([model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], depths=depths[:, t:t + 1],
                                 past_key_values=cache).logits[:, 0] for t in range(16)], 1).float()
    assert (par - seq)[mask.bool()].abs().max() <= 5e-2


def test_engine_equals_hf_generate_on_cuda():
    """Standard policy, greedy, fp32 on the GPU: the engine's tokens are HF generate's."""
    from tah.engine import Engine, EngineConfig, SamplingParams

    model, ref = make(max_depth=2)
    model.cuda()
    ref.cuda().eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 13)]
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=64, depth_policy="standard"))
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for o, p in zip(outs, prompts):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == hf


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs for 2 ranks (one per GPU)")
def test_two_worker_nccl_deepspeed_step(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    from tah.testing import nccl_deepspeed_step

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(nccl_deepspeed_step, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["loss_sum"] == r1["loss_sum"] and abs(r0["checksum"] - r1["checksum"]) < 1e-3
