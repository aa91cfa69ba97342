"""Muon's orthogonalisation alone: torch's Newton-Schulz, fastforeach's standard and Gram iterations."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..harness import device_sync
from ..models import MODELS, example_input

__all__ = ['newton_schulz_table', 'format_newton_schulz_table']


def newton_schulz_table(model='xresnet50', device='cpu', steps=5, warmup=1, batches=4) -> list[dict]:
    """Muon's orthogonalisation of every kernel Muon's default route picks in `model`, alone: time (median of
    `steps`, interleaved) of torch's Newton-Schulz (as `torch.optim.Muon` runs it), fastforeach's standard
    iteration and its Gram iteration, all in bf16, and each one's relative error against the iteration in
    float64, on gradients summed over `batches` batches of 16 random images with random labels (BatchNorm
    weights set to 1, so that every kernel has a gradient)."""
    import torch.optim._muon as torch_muon

    from ...optimizers.muon import NS_COEFFICIENTS, default_route, orthogonalize, orthogonalize_one
    torch.manual_seed(0)
    net = MODELS[model]().to(device)
    for m in net.modules():  # zero-initialised BatchNorm would leave the kernels before it no gradient
        if isinstance(m, nn.modules.batchnorm._BatchNorm): nn.init.ones_(m.weight)
    route = default_route([list(net.parameters())])
    for _ in range(batches):
        out = net(torch.randn((16, *example_input(model).shape[1:]), device=device))
        nn.functional.cross_entropy(out, torch.randint(out.shape[-1], out.shape[:1], device=device)).backward()
    matrices = [p.grad.reshape(p.shape[0], -1) for p in net.parameters() if route(p)]
    methods = {"torch's": lambda: [torch_muon._zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in matrices],
               'standard': lambda: orthogonalize(matrices, 5, torch.bfloat16, 'standard'),
               'gram': lambda: orthogonalize(matrices, 5, torch.bfloat16, 'gram')}
    sync = device_sync(device)
    times = {k: [] for k in methods}
    for i in range(warmup + steps):
        for k, run in methods.items():
            sync(); start = time.perf_counter(); run(); sync()
            if i >= warmup: times[k].append(time.perf_counter() - start)
    exact = [orthogonalize_one(m.double(), 5, torch.float64, 'standard') for m in matrices]
    rows = []
    for k, run in methods.items():
        errors = [((o.double() - e).norm() / e.norm()).item() for o, e in zip(run(), exact)]
        rows.append({'model': model, 'method': k, 'kernels': len(matrices), 'ms': statistics.median(times[k]) * 1e3,
                     'median_error': statistics.median(errors), 'max_error': max(errors)})
    return rows


def format_newton_schulz_table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'Newton-Schulz':<14} {'kernels':>8} {'ms':>8} {'error median':>13} {'error max':>10}"
    return '\n'.join(["Muon's orthogonalisation in bf16 of every kernel it steps (relative error against float64)",
                      head, '-' * len(head)] + [
        f"{r['model']:<12} {r['method']:<14} {r['kernels']:>8} {r['ms']:>8.2f} {r['median_error']:>12.2%} "
        f"{r['max_error']:>9.2%}" for r in rows])
