"""What only a CUDA GPU can show: FlexAttention backward, flash-attn kernels, bf16 end to end.

Skipped without CUDA; run with `make test-slow` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from tah.attention import flash_attn_available
from tah.testing import random_depths

from .test_model import batch, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["flex", "auto"] + (["flash"] if flash_attn_available() else []))
def test_cuda_backends_equal_reference_with_grads(backend):
    ids, mask = batch(B=3, T=40, padding="left", seed=1)
    depths = random_depths(3, 40, 3, hard_fraction=0.3, seed=2)
    res = {}
    for b in ("reference", backend):
        model, _ = make(max_depth=3, attn_backend=b)
        model.cuda()
        out = model(ids.cuda(), attention_mask=mask.cuda(), depths=depths.cuda(), labels=ids.cuda())
        out.loss.backward()
        res[b] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    v = mask.bool().cuda()
    assert (res[backend][0] - res["reference"][0])[v].abs().max() <= 1e-4
    for n, g in res["reference"][1].items():
        assert torch.allclose(res[backend][1][n], g, atol=1e-4, rtol=1e-3), n


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
