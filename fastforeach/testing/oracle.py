"""Run a fastforeach optimizer beside fastai's on identical copies of the same params, and compare.

Used by the oracle tests and by the benchmark's correctness column.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ['oracle_layers', 'Twins', 'compare_states', 'max_relative_difference']


def oracle_layers(dtype=torch.float32, device='cpu', seed=0) -> list[list[nn.Parameter]]:
    """Two param groups of real layer shapes (conv, batch norm, linear, biases), plus, last in the second
    group, a param that never gets a gradient. The second conv (9216 elements) is above the CPU's pack
    threshold and the rest below, so that compiled updates run both per tensor and packed on CPU."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 64, 3, bias=False), nn.BatchNorm2d(64))
    head = nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.Linear(24, 10), nn.Linear(10, 5))
    groups = [list(body.parameters()), list(head.parameters())]
    return [[nn.Parameter(p.detach().to(device=device, dtype=dtype).add_(0.1)) for p in g] for g in groups]


def _clone_groups(groups):
    return [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]


def _set_hyper(opt, key: str, values: list):
    "fastai's `set_hyper`, or its torch.optim counterpart for the benchmark's torch contenders."
    if hasattr(opt, 'set_hyper'): return opt.set_hyper(key, values)
    for group, v in zip(opt.param_groups, values): group[key] = v


class Twins:
    """Optimizer `a` and optimizer `b` on identical copies of `groups`, given identical gradients.

    With `mark_no_wd`, 1-d params (norm and bias) are marked `do_wd=False`, as fastai's Learner does; the
    last param of the last group never gets a gradient.

    With `low_precision` (a 16-bit dtype), `b` steps copies of `groups` in that dtype, and `a` float64
    copies of the same (rounded) values; the gradients are rounded to it too, so that both see the same
    numbers and only their arithmetic differs."""
    def __init__(self, build_a: Callable, build_b: Callable, groups, seed: int = 0, mark_no_wd: bool = True,
                 low_precision: torch.dtype | None = None):
        self.low_precision = low_precision
        if low_precision is not None:
            groups = [[p.detach().to(low_precision) for p in g] for g in groups]
            self.params_a = [[nn.Parameter(p.double()) for p in g] for g in groups]
            self.params_b = _clone_groups(groups)
        else: self.params_a, self.params_b = _clone_groups(groups), _clone_groups(groups)
        self.opt_a, self.opt_b = build_a(self.params_a), build_b(self.params_b)
        self.no_grad = (len(groups) - 1, len(groups[-1]) - 1)
        for opt, params in ((self.opt_a, self.params_a), (self.opt_b, self.params_b)):
            for p in (p for g in params for p in g):
                if mark_no_wd and p.ndim <= 1: opt.state[p]['do_wd'] = False
        # Gradients drawn on the first param's device: on CUDA, drawing a large model's on the CPU would take
        # most of the benchmark's correctness checks.
        first = next((p for g in groups for p in g), None)
        self.gen = torch.Generator(first.device if first is not None else 'cpu').manual_seed(seed)
        self.t = 0

    def pairs(self) -> Iterator[tuple[tuple[int, int], nn.Parameter, nn.Parameter]]:
        for gi, (ga, gb) in enumerate(zip(self.params_a, self.params_b)):
            for pi, (pa, pb) in enumerate(zip(ga, gb)): yield (gi, pi), pa, pb

    def step(self, base_lr: float, vary_mom: bool = True, in_place: bool = False):
        """Fresh random gradients, a new lr per group (and a new mom when there is one), then step both.
        `in_place`: `b`'s gradients written into the tensors it already has, as a training loop that zeroes
        them in place leaves them (else new tensors, as a gradient release makes)."""
        for where, pa, pb in self.pairs():
            if where == self.no_grad: continue
            g = torch.randn(pa.shape, generator=self.gen, dtype=torch.float64, device=self.gen.device).to(pb) * 0.1
            pa.grad = g.to(pa.dtype)
            if in_place and pb.grad is not None: pb.grad.copy_(g)
            else: pb.grad = g.clone()
        self.t += 1
        lr = base_lr * (1 + 0.5 * math.sin(self.t / 7))
        n = len(self.params_a)
        for opt in (self.opt_a, self.opt_b):
            _set_hyper(opt, 'lr', [lr / 3 ** (n - 1 - i) for i in range(n)])
            if vary_mom and opt.hypers[0].get('mom', 0): opt.set_hyper('mom', self._mom)
        for opt in (self.opt_a, self.opt_b): opt.step()

    @property
    def _mom(self):
        if not hasattr(self, '_base_mom'): self._base_mom = self.opt_a.hypers[0]['mom']
        return self._base_mom * (0.97 + 0.03 * math.cos(self.t / 5))

    def compared(self) -> Iterator[tuple[str, object, object]]:
        "Every param and every state value of both, labelled."
        for where, pa, pb in self.pairs(): yield f"param {where}", pa.detach(), pb.detach()
        # fastai-style optimizers (fastai's and fastforeach's fastai face) keep fastai's state dicts; others' differ.
        if all(hasattr(o, 'hypers') and not isinstance(o, torch.optim.Optimizer) for o in (self.opt_a, self.opt_b)):
            yield from compare_states(self.opt_a.state_dict(), self.opt_b.state_dict())


def compare_states(sd_a: dict, sd_b: dict) -> Iterator[tuple[str, object, object]]:
    "Pairs of values at the same place in two fastai-style state dicts; raise when their keys differ."
    for i, (sa, sb) in enumerate(zip(sd_a['state'], sd_b['state'])):
        if set(sa) != set(sb): raise AssertionError(f"state {i}: keys {sorted(sa)} != {sorted(sb)}")
        for k in sa: yield f"state {i} {k!r}", sa[k], sb[k]
    if 'count' in sd_a or 'count' in sd_b:
        yield 'count', sd_a.get('count'), sd_b.get('count')
        slow_a, slow_b = sd_a.get('slow_weights'), sd_b.get('slow_weights')
        if (slow_a is None) != (slow_b is None): raise AssertionError("slow_weights: one is None")
        if slow_a is not None:
            for gi, (ga, gb) in enumerate(zip(slow_a, slow_b)):
                for pi, (a, b) in enumerate(zip(ga, gb)): yield f"slow_weights {gi},{pi}", a, b


def max_relative_difference(twins: Twins) -> float:
    "Largest max|a − b| / max|a| over every tensor of the twins: 0 when they are equal."
    worst = 0.
    for _, a, b in twins.compared():
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        if a.numel(): worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    return worst
