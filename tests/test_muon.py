"""Muon's routes and its batched Newton-Schulz iterations."""
from functools import partial

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import fastforeach
from fastforeach.bench import MODELS


class CountCalls:
    "Wraps `owner.name`, counting its calls."
    def __init__(self, owner, name):
        self.fn, self.calls = getattr(owner, name), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class CountMatmuls(TorchFunctionMode):
    "Counts the matrix products a step launches (matmul, @, bmm, baddbmm, addmm, mm)."
    NAMES = {'matmul', '__matmul__', 'bmm', 'baddbmm', 'addmm', 'mm'}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', '') in self.NAMES: self.calls += 1
        return func(*args, **(kwargs or {}))


def test_default_route_sends_matrices_to_muon_and_the_rest_to_adamw():
    body, head = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), nn.Linear(8, 4)
    groups = [list(body.parameters()), list(head.parameters())]
    opt = fastforeach.Muon(groups, 1e-3)
    for p in (p for g in groups for p in g): p.grad = torch.randn_like(p)
    opt.step()
    conv, bn_w, bn_b, head_w, head_b = (p for g in groups for p in g)
    assert set(opt.state[conv]) == {'grad_avg', 'muon'} and opt.state[conv]['muon']   # Muon: its momentum only
    for p in (bn_w, bn_b, head_w, head_b):                                                # AdamW
        assert set(opt.state[p]) == {'grad_avg', 'sqr_avg', 'step', 'muon'} and not opt.state[p]['muon']


def test_a_state_flag_overrides_the_route():
    "As do_wd: opt.state[p]['muon'] = False sends a matrix to AdamW (an embedding, say)."
    emb, lin = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(4, 4))
    opt = fastforeach.Muon([[emb, lin], [nn.Parameter(torch.randn(2, 4))]], 1e-3)
    opt.state[emb]['muon'] = False
    for p in (emb, lin): p.grad = torch.randn_like(p)
    opt.step()
    assert 'sqr_avg' in opt.state[emb] and 'sqr_avg' not in opt.state[lin]


def products_per_step(shape, alone: bool) -> int:
    """Matrix products (launches) Newton-Schulz makes for one batch of matrices of `shape`, 5 iterations.
    Standard: per iteration a Gram matrix, its square, and the add-product into X. Gram iteration: runs of 3
    and 2 iterations, each a Gram matrix, one square per iteration, a product into Q but on the run's
    first, two for H R H but on its last, and Q X. A symmetric product of one matrix of 512 rows or more
    is two launches (the upper block row, the lower-right block)."""
    from fastforeach.optimizers.muon import SYMMETRIC_FROM, uses_gram
    split = 2 if alone and min(shape) >= SYMMETRIC_FROM else 1
    if not uses_gram(shape, 5): return 5 * (2 * split + 1)
    return sum(split * (1 + run + (run - 1) + 2 * (run - 1)) + 1 for run in (3, 2))


def test_equal_shapes_share_their_matmuls_on_xresnet50():
    """One step on xresnet50: one batch of products per distinct shape of the matrices under `ONE_AT_A_TIME`
    elements, and one per matrix above it or alone in its shape."""
    from collections import Counter

    from fastforeach.optimizers.muon import ONE_AT_A_TIME, uses_gram
    params = list(MODELS['xresnet50']().parameters())
    opt = fastforeach.Muon(params, 1e-3)
    for p in params: p.grad = torch.randn_like(p) * 1e-3
    shapes = Counter((p.shape[0], p[0].numel()) for p in params if opt.takes_muon(p))
    batched = [s for s, n in shapes.items() if n > 1 and s[0] * s[1] < ONE_AT_A_TIME]
    alone = [s for s, n in shapes.items() for _ in range(n) if s not in batched]
    with CountMatmuls() as count: opt.step()
    expected = sum(products_per_step(s, False) for s in batched) + sum(products_per_step(s, True) for s in alone)
    assert count.calls == expected
    # 55 conv kernels of 22 shapes: 37 in 9 batches, 18 alone; 20 shapes in the Gram iteration
    assert (shapes.total(), len(shapes), len(batched), len(alone), sum(map(partial(uses_gram, steps=5), shapes))) == \
        (55, 22, 9, 18, 20)
    assert count.calls == 656


@pytest.mark.parametrize('method', ['gram', 'standard'])
def test_matrices_one_at_a_time_equal_the_reference(monkeypatch, method):
    """The path for large matrices (every matrix, with the threshold at 1 element), with symmetric products
    in blocks (from 2 rows), against torch's Muon, float64."""
    from test_references import run_beside_reference  # tests/ is on the path, as pytest imports test modules

    import fastforeach.optimizers.muon as muon
    monkeypatch.setattr(muon, 'ONE_AT_A_TIME', 1)
    monkeypatch.setattr(muon, 'SYMMETRIC_FROM', 2)
    products = CountCalls(muon.torch, 'mm')  # the upper block row of each symmetric product
    monkeypatch.setattr(muon.torch, 'mm', products)
    run_beside_reference('Muon', 'foreach', {'ns_method': method}, steps=10)
    assert products.calls > 0


@pytest.mark.parametrize('config', ['default', 'plain'])
def test_fused_passes_equal_the_reference(monkeypatch, config):
    """The fused step's compiled passes (every matrix, with the threshold at 1 element), with and without
    Nesterov, against torch's Muon, float64; they ran (2 per matrix and step), not the foreach ops."""
    from test_references import run_beside_reference

    import fastforeach.optimizers.muon as muon
    from fastforeach.registry import REGISTRY
    monkeypatch.setitem(muon.FUSED_FROM, 'cpu', 1)
    passes = CountCalls(muon, 'run_flat')
    monkeypatch.setattr(muon, 'run_flat', passes)
    opt, _, _ = run_beside_reference('Muon', 'fused', REGISTRY['Muon'].configs[config], steps=10)
    assert passes.calls == 2 * 10 * sum(opt.takes_muon(p) for pg in opt.param_lists for p in pg[:-1] if p.ndim > 1)


def test_fused_step_takes_the_foreach_passes_for_channels_last_kernels(monkeypatch):
    "A kernel in channels_last is not contiguous as a matrix: the fused step gives it the foreach passes, as equal."
    import fastforeach.optimizers.muon as muon
    monkeypatch.setitem(muon.FUSED_FROM, 'cpu', 1)
    torch.manual_seed(0)
    kernels = [torch.randn(8, 4, 3, 3, dtype=torch.float64) for _ in range(2)]
    kernels[0] = kernels[0].to(memory_format=torch.channels_last)
    steps = {}
    for fused in (False, True):
        params = [nn.Parameter(k.clone(memory_format=torch.preserve_format)) for k in kernels]
        opt = fastforeach.Muon([params, [nn.Parameter(torch.randn(2, 2, dtype=torch.float64))]], 1e-2, fused=fused,
                               ns_dtype=torch.float64)
        for _ in range(3):
            for p in params: p.grad = torch.arange(p.numel(), dtype=p.dtype).view(p.shape).sin().add_(0.1)
            opt.step()
        steps[fused] = params
    assert not steps[True][0].is_contiguous()
    for a, b in zip(steps[False], steps[True]): torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
