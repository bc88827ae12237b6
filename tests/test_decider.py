"""The v1 decider's inputs and forward against independent references: `topk_logits` against torch.topk
(the same values; ids that hold them, each once), the decider's forward against its modules composed as
the paper describes them.

    .venv/bin/python -m pytest -q tests/test_decider.py        # a few seconds
"""

from __future__ import annotations

import pytest
import torch

from tah.config import DeciderSettings
from tah.decider import IterationDecider, topk_logits


@pytest.mark.parametrize("V,k", [(8192, 100), (8192, 1), (1600, 100), (4096 * 3, 20), (512, 100), (512, 16)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_logits_equals_torch_topk(V, k, ties):
    g = torch.Generator().manual_seed(V + k)
    x = torch.randn(7, V, generator=g) * 3
    if ties:  # a few distinct values: every top-k crosses ties
        x = torch.randint(-20, 4, (7, V), generator=g).float()
    x[3] = float("-inf")  # a row with nothing but -inf
    x[4, ::2] = float("-inf")
    ref = x.topk(k, dim=-1)
    got = topk_logits(x, k)
    assert torch.equal(got.values, ref.values)
    assert torch.equal(x.gather(1, got.indices), got.values)  # each id holds its value ...
    assert all(len(set(row)) == k for row in got.indices.tolist())  # ... and appears once
    if not ties:
        assert torch.equal(got.indices[[0, 1, 2, 5, 6]], ref.indices[[0, 1, 2, 5, 6]])


def test_topk_logits_on_a_view_and_with_gradient():
    x = torch.randn(4, 1, 8192, requires_grad=True)
    got = topk_logits(x[:, 0], 100)  # (the engine's lm_head(h)[:, 0])
    assert torch.equal(got.values, x[:, 0].topk(100, dim=-1).values)
    got.values.sum().backward()
    assert x.grad.sum() == 4 * 100 and set(x.grad.unique().tolist()) == {0.0, 1.0}
    one = topk_logits(x[:1, 0].detach(), 100)  # (a single row: torch.topk itself)
    assert torch.equal(one.values, got.values[:1].detach()) and torch.equal(one.indices, got.indices[:1])


def test_decider_forward_equals_its_modules_composed():
    torch.manual_seed(0)
    d = IterationDecider(64, 4, 100, DeciderSettings(width=32, blocks=2, dropout=0.1)).eval()
    hs = [torch.randn(5, 64) for _ in range(4)]
    t = torch.randn(5, 100)
    x = d.mid(d.inp(torch.cat(hs + [d.logit_proj(t)], dim=-1)))
    for b in d.blocks:  # pre-LayerNorm residual MLP blocks; dropout is the identity in eval
        x = x + b.fc2(b.act(b.fc1(b.norm(x))))
    assert torch.equal(d(hs, t), d.head(d.norm(x)).squeeze(-1))
    d.train()  # in training the dropout applies: outputs differ from eval's
    torch.manual_seed(1)
    assert not torch.equal(d(hs, t), d.eval()(hs, t))
