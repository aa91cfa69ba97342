"""Muon's routes and its batched Newton-Schulz iterations."""
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import fastforeach
from fastforeach.bench import MODELS


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


def test_equal_shapes_share_their_matmuls_on_xresnet50():
    """One step on xresnet50: 3 matrix products per Newton-Schulz iteration (5) per distinct shape of the
    matrices under `ONE_AT_A_TIME` elements, and per matrix above it."""
    from fastforeach.optimizers.muon import ONE_AT_A_TIME
    params = list(MODELS['xresnet50']().parameters())
    opt = fastforeach.Muon(params, 1e-3)
    for p in params: p.grad = torch.randn_like(p) * 1e-3
    routed = [p for p in params if opt.takes_muon(p)]
    small = {(p.shape[0], p[0].numel()) for p in routed if p.numel() < ONE_AT_A_TIME}
    large = [p for p in routed if p.numel() >= ONE_AT_A_TIME]
    with CountMatmuls() as count: opt.step()
    assert count.calls == 3 * 5 * (len(small) + len(large))
    # 55 conv kernels: 46 in 18 batches, 9 large ones alone: 405 matrix products (825 one at a time)
    assert (len(routed), len(small), len(large), count.calls) == (55, 18, 9, 405)


def test_matrices_one_at_a_time_equal_the_reference(monkeypatch):
    "The path for large matrices (every matrix, with the threshold at 1 element) against torch's Muon, float64."
    from test_references import run_beside_reference  # tests/ is on the path, as pytest imports test modules

    import fastforeach.optimizers.muon as muon
    monkeypatch.setattr(muon, 'ONE_AT_A_TIME', 1)
    run_beside_reference('Muon', 'foreach', {}, steps=10)
