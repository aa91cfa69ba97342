"""Gradient release against a normal step: gradients alive during backward, and the optimizer's time."""
from __future__ import annotations

import statistics
import time

import torch

from ...registry import REGISTRY
from ..harness import device_sync
from ..models import MODELS, example_input

__all__ = ['release_table', 'format_release_table']


def release_table(model: str, device='cpu', steps=5, warmup=2, optimizer='Adam') -> list[dict]:
    """Gradient release against a normal step (fused `optimizer`, the same forward and backward passes):
    the most bytes of gradients alive at once during backward, and the optimizer's time per step (summed
    over the buckets stepped in backward's hooks, with release)."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    import fastforeach

    from ...callbacks import GradientRelease
    from ...memory import PeakGradBytes
    rows = []
    for release in (False, True):
        torch.manual_seed(0)
        net = MODELS[model]().to(device)
        x = example_input(model, device)
        learn = Learner(DataLoaders(device=device), net, loss_func=lambda *_: 0,
                        opt_func=lambda ps, lr: getattr(fastforeach, optimizer)(ps, REGISTRY[optimizer].lr, fused=True))
        learn.create_opt()
        cb = GradientRelease() if release else None
        if cb: learn.add_cb(cb); cb.before_fit()
        learn.training, tracker, times = True, PeakGradBytes(net.parameters()), []
        sync = device_sync(device)
        for i in range(warmup + steps):
            loss = net(x).float().pow(2).mean()
            if cb: cb.before_backward()
            loss.backward()
            if cb:
                cb.after_backward()
                seconds = cb.step_seconds
            else:
                sync(); start = time.perf_counter()
                learn.opt.step()
                sync(); seconds = time.perf_counter() - start
                learn.opt.zero_grad()
            if i >= warmup: times.append(seconds)
        if cb: cb.after_fit()
        tracker.remove()
        grads = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        rows.append({'model': model, 'optimizer': optimizer, 'release': release, 'peak_grad_bytes': tracker.peak,
                     'peak_share': tracker.peak / grads, 'step_ms': statistics.median(times) * 1e3})
    return rows


def format_release_table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'optimizer':<10} {'release':<8} {'peak grad MB':>13} {'of all grads':>13} {'step ms':>8} {'/ normal':>9}"
    normal = {r['model']: r['step_ms'] for r in rows if not r['release']}
    return '\n'.join(['gradient release: gradients alive during backward, and optimizer time per step', head,
                      '-' * len(head)] + [
        f"{r['model']:<12} {r['optimizer']:<10} {str(r['release']):<8} {r['peak_grad_bytes'] / 2**20:>13.2f} "
        f"{r['peak_share']:>12.1%} {r['step_ms']:>8.2f} {r['step_ms'] / normal[r['model']]:>8.2f}x" for r in rows])
