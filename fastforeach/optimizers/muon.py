"""Muon (Jordan et al. 2024; `torch.optim.Muon`): momentum orthogonalised by Newton-Schulz iterations, for
matrix params; the others (1-d params, and any the route sends there) take AdamW steps in the same optimizer.

Which params take Muon steps: `route(p)`, by default `default_route`: every param of 2 dims or more
(convolution kernels flattened to out × in·kh·kw) except the last such param of the last param group,
which with fastai's splitters is the head's weight. A param's `opt.state[p]['muon']`, when set (True or
False), overrides the route, as `do_wd` does for weight decay: e.g. for an embedding.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from fastai.optimizer import Optimizer, average_grad, average_sqr_grad, l2_reg, step_stat, weight_decay

from ..accumulation import refuses_accumulation
from ..engine import ForEachOptimizer
from ..rules import StepRule
from .adam import adam_step, fused_adam_step

__all__ = ['MuonForEachOptimizer', 'muon_step', 'orthogonalize', 'default_route', 'DefaultRoute', 'native_muon',
           'NS_COEFFICIENTS']

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al. (torch.optim.Muon's defaults)
NS_EPS = 1e-7
ONE_AT_A_TIME = 1 << 20  # elements of a matrix from which equal shapes are not batched
ADJUSTMENTS = ('match_rms_adamw', 'original', 'none')


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    "A param of 2 dims or more as the matrix Muon orthogonalises: rows are its first dim."
    return t.reshape(t.shape[0], -1)


def adjusted_lr(lr: float, shape, adjust_lr: str) -> float:
    """Muon's lr for a matrix of `shape` (rows, cols): 'match_rms_adamw' (Liu et al. 2025) scales the update
    to AdamW's RMS, 0.2·√max(rows, cols), so that one lr suits both routes; 'original', √max(1, rows/cols)."""
    rows, cols = shape
    if adjust_lr == 'match_rms_adamw': return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == 'original': return lr * math.sqrt(max(1., rows / cols))
    return lr


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration on a matrix, or a stack of them, (rows ≤ cols), each normalised to a norm of at
    most 1 first (in place)."""
    a, b, c = NS_COEFFICIENTS
    add_product = torch.addmm if x.ndim == 2 else torch.baddbmm
    x = x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(NS_EPS))
    for _ in range(steps):
        gram = x @ x.mT
        x = add_product(x, add_product(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def orthogonalize_one(m: torch.Tensor, steps: int, dtype: torch.dtype | None) -> torch.Tensor:
    "Newton-Schulz orthogonalisation of one matrix, in `dtype` (None: its own), on a copy (transposed when tall)."
    tall = m.shape[0] > m.shape[1]
    x = _newton_schulz((m.T if tall else m).to(dtype or m.dtype, copy=True), steps)  # it scales its input in place
    return x.T if tall else x


def orthogonalize(ms: list[torch.Tensor], steps: int, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """Newton-Schulz orthogonalisation of each matrix, in `dtype` (None: their own): matrices of the same
    shape stacked and iterated together, two batched matmuls and a batched add-matmul per iteration."""
    out: list = [None] * len(ms)
    by_shape: dict = {}
    for i, m in enumerate(ms): by_shape.setdefault(tuple(m.shape), []).append(i)
    for (rows, cols), idx in by_shape.items():
        tall = rows > cols
        if rows * cols >= ONE_AT_A_TIME:
            # Large matrices: a batch saves no launch worth having, and CPU's batched products were
            # slower than one at a time (xresnet50's 512 × 4608: 0.135 s a batch of 4 against 0.129 s).
            for i in idx: out[i] = orthogonalize_one(ms[i], steps, dtype)
            continue
        # One pass per matrix: cast, and transposed when tall, into its slot of the batch.
        x = torch.empty((len(idx), *((cols, rows) if tall else (rows, cols))), dtype=dtype or ms[idx[0]].dtype,
                        device=ms[idx[0]].device)
        for k, i in enumerate(idx): x[k].copy_(ms[i].T if tall else ms[i])
        x = _newton_schulz(x, steps)
        for k, i in enumerate(idx): out[i] = (x[k].mT if tall else x[k])
    return out


def muon_step(p, g, grad_avg, *, lr, mom, nesterov, ns_steps, ns_dtype, adjust_lr, whole=None):
    """grad_avg ← mom·grad_avg + (1 − mom)·g;  u = (1 − mom)·g + mom·grad_avg with `nesterov`, else grad_avg;
    p ← p − adjusted_lr·NS(u), with u as a matrix (see `orthogonalize`, `adjusted_lr`). Under FSDP2 (`whole`)
    each rank gathers the whole u, orthogonalises it, and steps its shard of the result."""
    torch._foreach_lerp_(grad_avg, g, 1 - mom)
    update = torch._foreach_lerp(g, grad_avg, mom) if nesterov else grad_avg
    wholes = whole.gather(update) if whole is not None else update
    matrices = [as_matrix(u) for u in wholes]
    ortho = orthogonalize(matrices, ns_steps, ns_dtype)
    if whole is not None: ortho = whole.shards([o.reshape(u.shape) for o, u in zip(ortho, wholes)])
    for pi, o, m in zip(p, ortho, matrices):
        alpha = -adjusted_lr(lr, m.shape, adjust_lr)
        if pi.is_contiguous(): pi.view(o.shape).add_(o, alpha=alpha)  # as a matrix: no copy of a transposed o
        else: pi.add_(o.reshape(pi.shape), alpha=alpha)


muon_step.unchunked = True  # its batches of equal shapes span the whole bucket
refuses_accumulation(muon_step, "Muon orthogonalises its Nesterov mix of momentum and gradient, and optimizer "
                                "accumulation keeps no gradient")


class DefaultRoute:
    "The default route (see the module docstring): params of 2 dims or more, but `head`."
    def __init__(self, head): self.head = head
    def __call__(self, p) -> bool: return p.ndim >= 2 and p is not self.head


def default_route(groups: list[list[torch.Tensor]]) -> Callable[[torch.Tensor], bool]:
    "The default route for the param groups `groups`: the head is the last param of 2 dims or more of the last."
    return DefaultRoute(next((p for p in reversed(groups[-1]) if p.ndim >= 2), None) if groups else None)


def muon_stepper(p, lr, mom, sqr_mom, eps, nesterov, ns_steps, ns_dtype, adjust_lr, muon=True, grad_avg=None, **kwargs):
    "fastai-style stepper, one param, after the route's: the Muon step (the per-param reference of the tests)."
    if not muon: return {}
    g = p.grad.data
    if grad_avg is None: grad_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
    grad_avg.mul_(mom).add_(g, alpha=1 - mom)
    u = (1 - mom) * g + mom * grad_avg if nesterov else grad_avg
    m = as_matrix(u)
    p.data.view(m.shape).add_(orthogonalize_one(m, ns_steps, ns_dtype), alpha=-adjusted_lr(lr, m.shape, adjust_lr))
    return {'grad_avg': grad_avg}


class _AdamPart:
    "A fastai stepper that runs only for params routed to AdamW (a class: optimizers are pickled, steppers too)."
    def __init__(self, stepper): self.stepper = stepper
    def __call__(self, p, muon=True, **kwargs): return {} if muon else self.stepper(p, **kwargs)


class _RoutedNativeMuon(Optimizer):
    "fastai's per-param `Optimizer`, each param's state told its route before the steppers run."
    def __init__(self, params, cbs, route, **defaults):
        super().__init__(params, cbs, **defaults)
        self.route = route or default_route([list(pg) for pg in self.param_lists])

    def step(self, closure=None):
        "fastai's step, each param's route written in its state the first time it steps (as fastforeach's)."
        for pg in self.param_lists:
            for p in pg:
                if p.grad is not None and 'muon' not in self.state[p]: self.state[p]['muon'] = self.route(p)
        return super().step(closure)


def native_muon(params, lr, mom=0.95, sqr_mom=0.95, eps=1e-8, wd=0.1, decouple_wd=True, nesterov=True, ns_steps=5,
                ns_dtype=torch.bfloat16, adjust_lr='match_rms_adamw', route=None):
    "Muon as fastai would write it: a fastai `Optimizer` of per-param steppers, AdamW for the routed-out params."
    adam = [partial(average_grad, dampening=True), average_sqr_grad, step_stat]
    from fastai.optimizer import adam_step as fastai_adam_step
    cbs = [weight_decay if decouple_wd else l2_reg, *map(_AdamPart, adam + [fastai_adam_step]), muon_stepper]
    return _RoutedNativeMuon(params, cbs, route, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, nesterov=nesterov,
                             ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr)


class MuonForEachOptimizer(ForEachOptimizer):
    """Muon for the params `route` picks (see the module docstring), AdamW for the others, in one optimizer
    whose hypers both share (`lr`, `mom`, `wd`; `sqr_mom` and `eps` are AdamW's). "foreach": matrices of
    the same shape are orthogonalised together in batched matmuls. `fused=True`: PyTorch's fused AdamW for
    the AdamW params; the Muon step is its batched matmuls either way."""
    def __init__(self, params, lr, mom=0.95, sqr_mom=0.95, eps=1e-8, wd=0.1, decouple_wd=True, nesterov=True,
                 ns_steps=5, ns_dtype=torch.bfloat16, adjust_lr='match_rms_adamw', route=None, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32):
        if adjust_lr not in ADJUSTMENTS: raise ValueError(f"Invalid adjust_lr: {adjust_lr!r} (must be one of {ADJUSTMENTS})")
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or not 0 < ns_steps < 100:
            raise ValueError(f"Invalid ns_steps: {ns_steps!r} (must be an int in [1, 100))")
        super().__init__(params, muon_step, decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype,
                         fastai=native_muon, fastai_options={'route': route}, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps,
                         wd=wd, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr)
        self.route = route or default_route([list(pg) for pg in self.param_lists])
        self.routes = {True: (self.rule, None), False: (StepRule.of(adam_step), fused_adam_step if fused else None)}
        self._active = None

    @property
    def fused_steps(self) -> list:
        "The AdamW route's fused kernel, with `fused=True` (the Muon route is batched matmuls either way)."
        return [fused for _, fused in self.routes.values() if fused is not None]

    def takes_muon(self, p, state: dict | None = None) -> bool:
        "Whether `p` takes Muon steps: its state's `muon` flag when set, else the route."
        state = state if state is not None else self.state[p] if p in self.state else {}
        return bool(state.get('muon', self.route(p)))

    def _takes(self, p) -> bool:
        # The route is written in the state the first time a param steps: copies and checkpoints keep it.
        if 'muon' not in self.state[p]: self.state[p]['muon'] = self.route(p)
        return self._active is None or self.takes_muon(p) == self._active

    def _rule_of(self, p, state: dict) -> StepRule: return self.routes[self.takes_muon(p, state)][0]

    def _run_fastai(self, bucket, hyper: dict):
        "fastai-style steppers (16-bit params rounded to nearest), told the bucket's route."
        super()._run_fastai(bucket, {**hyper, 'muon': self._active})

    def _step_all(self, only=None):
        "The params of each route gathered and stepped in turn, by the route's rule."
        for muon, (rule, fused) in self.routes.items():
            self._active, self.rule, self.fused = muon, rule, fused
            try: super()._step_all(only)
            finally: self._active, (self.rule, self.fused) = None, self.routes[True]
