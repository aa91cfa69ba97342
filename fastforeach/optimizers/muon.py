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

from ..fastai import ForEachOptimizer
from ..ops import device_tensor
from ..fused import Coefficients, coefficient_dtype, flat_compiles, run_flat
from ..core import Route
from ..rules import StepRule, choice, count, declare
from .adam import adam_step, fused_adam_step

__all__ = ['MuonForEachOptimizer', 'muon_step', 'fused_muon_step', 'orthogonalize', 'orthogonalize_one', 'uses_gram',
           'symmetric_product', 'default_route', 'DefaultRoute', 'native_muon', 'NS_COEFFICIENTS', 'NS_METHODS']

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al. (torch.optim.Muon's defaults)
NS_EPS = 1e-7
ONE_AT_A_TIME = 1 << 20  # elements of a matrix from which equal shapes are not batched
GRAM_RUN = 3  # Gram iterations between restarts
# Elements of a matrix from which the fused step's passes are compiled, per device type (others: as the CPU).
# On CUDA a compiled call costs the host more than the three passes it saves cost the device, short of
# matrices far past a language model's (H200, xresnet50: 32.7 ms a step compiled, 23.0 ms foreach).
FUSED_FROM = {'cpu': 1 << 16, 'cuda': 1 << 28}
SYMMETRIC_FROM = 512  # rows of a symmetric product from which its lower-left block is mirrored
NS_METHODS = ('gram', 'standard')
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


def uses_gram(shape, steps: int) -> bool:
    """Whether the Gram iteration (`_gram_newton_schulz`) takes fewer multiply-adds than the standard one for
    a matrix of `shape`: for m ≤ n, the standard makes steps·(2m²n + m³), the Gram 2m²n + (4L − 3)m³ per run of
    L iterations between restarts. With 5 steps: when n > 1.5m."""
    m, n = sorted(shape)
    runs = [min(GRAM_RUN, steps - start) for start in range(0, steps, GRAM_RUN)]
    return sum(2 * m * m * n + (4 * run - 3) * m ** 3 for run in runs) < steps * (2 * m * m * n + m ** 3)


def symmetric_product(a: torch.Tensor, b: torch.Tensor, plus: torch.Tensor | None = None, beta: float = 1.,
                      alpha: float = 1.) -> torch.Tensor:
    """a @ b, or beta·plus + alpha·(a @ b) (as `addmm`, one rounding), for a result known to be symmetric
    (XXᵀ, or commuting symmetric matrices). On CPU, from m = `SYMMETRIC_FROM` rows, of one matrix: its upper
    block row and lower-right block, three quarters of the multiply-adds, the lower-left block mirrored (a
    quarter faster at 512 and 1024 rows; smaller and batched products gain nothing; on a GPU, where it
    would be two launches and a copy for one, unmeasured)."""
    m = a.shape[-2]
    add_product = torch.addmm if a.ndim == 2 else torch.baddbmm
    if a.ndim > 2 or m < SYMMETRIC_FROM or a.device.type != 'cpu':
        return a @ b if plus is None else add_product(plus, a, b, beta=beta, alpha=alpha)
    half, out = m // 2, a.new_empty((m, m))
    if plus is None:
        torch.mm(a[:half], b, out=out[:half])
        out[half:, half:] = a[half:] @ b[:, half:]
    else:
        torch.addmm(plus[:half], a[:half], b, beta=beta, alpha=alpha, out=out[:half])
        out[half:, half:] = torch.addmm(plus[half:, half:], a[half:], b[:, half:], beta=beta, alpha=alpha)
    out[half:, :half] = out[:half, half:].T
    return out


def _products(x: torch.Tensor):
    """For a matrix, or a stack of them, of rows ≤ cols: X ↦ X Xᵀ and (M, X) ↦ M X. Taller than wide:
    XᵀX and X M, so that no transposed copy is made."""
    if x.shape[-2] <= x.shape[-1]: return (lambda y: symmetric_product(y, y.mT)), (lambda m, y: m @ y), False
    return (lambda y: symmetric_product(y.mT, y)), (lambda m, y: y @ m), True


def _polynomial(r: torch.Tensor, coefficients) -> torch.Tensor:
    "aI + bR + cR² for a symmetric R (a matrix or a stack): bR + cR² as one add-product, as torch's Muon."
    a, b, c = coefficients
    h = symmetric_product(r, r, r, beta=b, alpha=c)
    if a: h.diagonal(dim1=-2, dim2=-1).add_(a)
    return h


def _standard_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    "X ← aX + (bA + cA²)X with A = XXᵀ, `steps` times (torch.optim.Muon's arithmetic)."
    a, b, c = NS_COEFFICIENTS
    add_product = torch.addmm if x.ndim == 2 else torch.baddbmm
    gram, _, tall = _products(x)
    for _ in range(steps):
        h = _polynomial(gram(x), (0., b, c))
        x = add_product(x, x, h, beta=a) if tall else add_product(x, h, x, beta=a)
    return x


def _gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration on the small Gram matrix R = XXᵀ (Amsel, Chen, Dao et al. 2026): each step is
    X ← H X with H = aI + bR + cR², a polynomial in R, so it commutes with R and the next Gram matrix is
    H R H. A run of iterations multiplies the m × m matrices H into Q and applies Q to X once; every
    `GRAM_RUN` iterations the run restarts from the X it reached, with R formed afresh, since the R carried
    forward in 16 bits drifts (spurious negative eigenvalues, which the iteration then amplifies). Every
    m × m product is symmetric (`symmetric_product`). X's scaling to a norm of at most 1 is folded into R
    and the first Q: the squared norm is R's trace."""
    gram, apply, _ = _products(x)
    for start in range(0, steps, GRAM_RUN):
        run, r, q = min(GRAM_RUN, steps - start), gram(x), None
        if start == 0:
            norm = r.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float32 if r.dtype != torch.float64 else None)
            scale = norm.sqrt_().clamp_min_(NS_EPS).reciprocal_()[..., None, None]
            r = r.mul_(scale.square().to(r.dtype))  # in R's dtype: a mixed-dtype product is slow on CPU
        for i in range(run):
            h = _polynomial(r, NS_COEFFICIENTS)
            q = h if q is None else symmetric_product(h, q)
            if i < run - 1: r = symmetric_product(symmetric_product(h, r), h)
        x = apply(q.mul_(scale.to(q.dtype)) if start == 0 else q, x)
    return x


def _newton_schulz(x: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """The quintic iteration on a matrix, or a stack of them, each scaled to a norm of at most 1 first: by
    `method`, 'gram' where `uses_gram` says it is cheaper, else 'standard' (which scales `x` in place)."""
    if method == 'gram' and uses_gram(x.shape[-2:], steps): return _gram_newton_schulz(x, steps)
    x = x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(NS_EPS))
    return _standard_newton_schulz(x, steps)


def orthogonalize_one(m: torch.Tensor, steps: int, dtype: torch.dtype | None, method: str = 'gram') -> torch.Tensor:
    "Newton-Schulz orthogonalisation of one matrix, in `dtype` (None: its own), on a copy."
    return _newton_schulz(m.to(dtype or m.dtype, copy=True), steps, method)


def orthogonalize(ms: list[torch.Tensor], steps: int, dtype: torch.dtype | None, method: str = 'gram',
                  fill: Callable | None = None) -> list[torch.Tensor]:
    """Newton-Schulz orthogonalisation of each matrix, in `dtype` (None: their own): matrices of the same
    shape stacked and iterated together in batched matmuls. `fill(i, out)`, when given, writes the i-th
    matrix into `out` (in `dtype`), where it would be a cast copy of `ms[i]`: the fused step computes it
    there, and `ms` need only have its shape."""
    fill = fill or (lambda i, out: out.copy_(ms[i]))
    out: list = [None] * len(ms)
    by_shape: dict = {}
    for i, m in enumerate(ms): by_shape.setdefault(tuple(m.shape), []).append(i)
    for (rows, cols), idx in by_shape.items():
        like = ms[idx[0]]
        # Large matrices one at a time, as matrices (symmetric products apply): a batch saves no launch worth
        # having, and CPU's batched products were slower (xresnet50's 512 × 4608: 0.135 s a batch of 4
        # against 0.129 s). A shape of one matrix is iterated as a matrix too.
        alone = rows * cols >= ONE_AT_A_TIME or len(idx) == 1
        for batch in ([[i] for i in idx] if alone else [idx]):
            x = torch.empty((len(batch), rows, cols), dtype=dtype or like.dtype, device=like.device)
            for k, i in enumerate(batch): fill(i, x[k])
            x = _newton_schulz(x[0] if alone else x, steps, method)
            for k, i in enumerate(batch): out[i] = x if alone else x[k]
    return out


# The fused step's passes (whole matrices, flat): the average (damp: 1 − mom), then the decay with the move.
AVERAGE, MOVE = Coefficients('damp', 'mom', decay=False), Coefficients('factor', 'alpha', decay=False)


def _nesterov_update(g, grad_avg, out, c):
    "The fused step's first pass: grad_avg ← grad_avg + (1 − mom)·(g − grad_avg), out ← g + mom·(grad_avg − g)."
    grad_avg.add_(c[AVERAGE.damp] * (g - grad_avg))
    out.copy_(g + c[AVERAGE.mom] * (grad_avg - g))


def _momentum_update(g, grad_avg, out, c):
    "The fused step's first pass without Nesterov: grad_avg ← grad_avg + (1 − mom)·(g − grad_avg), out ← grad_avg."
    grad_avg.add_(c[AVERAGE.damp] * (g - grad_avg))
    out.copy_(grad_avg)


def _apply_update(p, o, c):
    "One matrix of the fused step's last pass: p ← factor·p + alpha·o (decoupled decay and the move)."
    p.mul_(c[MOVE.factor]).add_(c[MOVE.alpha] * o)


def _fusable(*tensors) -> bool:
    "Whether a matrix's tensors can go to a compiled pass flat: each contiguous, so in the matrix's order."
    return all(t.is_contiguous() for t in tensors)


def matrix_shape(t: torch.Tensor) -> tuple[int, int]:
    "The shape of `as_matrix(t)`."
    return t.shape[0], t.numel() // t.shape[0] if t.shape[0] else 0


def _fused_passes_compile(first: Callable, p: torch.Tensor, g: torch.Tensor, ns_dtype: torch.dtype) -> bool:
    "Whether the fused step's passes (`first`, then the move) compile for these dtypes (else: warned once, eager)."
    return (flat_compiles((first, 0, True), g, 2, (g.dtype, g.dtype, ns_dtype))
            and flat_compiles((_apply_update, 0, True), p, 2, (p.dtype, ns_dtype)))


def muon_step(p, g, grad_avg, *, lr, mom, nesterov, ns_steps, ns_dtype, ns_method, adjust_lr, decay=None, whole=None,
              compiled=False):
    """grad_avg ← mom·grad_avg + (1 − mom)·g;  u = (1 − mom)·g + mom·grad_avg with `nesterov`, else grad_avg;
    p ← p·(1 − lr·wd) − adjusted_lr·NS(u), with u as a matrix (see `orthogonalize`, `adjusted_lr`); `decay`
    holds each param's wd (0 where `do_wd` is False). Under FSDP2 (`whole`) each rank gathers the whole u,
    orthogonalises it, and steps its shard of the result.

    `compiled` (the fused step): for each matrix of `FUSED_FROM` elements or more (per device), the averages with u
    written in `ns_dtype` into its batch, and the decay with the move, are each one compiled pass, where
    the foreach ops make five and a float32 u (smaller matrices: the foreach ops, fewer calls)."""
    factors = [1 - lr * wd for wd in decay] if decay is not None else [1.] * len(p)
    ns_dtype = ns_dtype or p[0].dtype
    sharded = whole is not None and whole.sharded
    first = _nesterov_update if nesterov else _momentum_update
    passes = compiled and not sharded and _fused_passes_compile(first, p[0], g[0], ns_dtype)
    fused_from = FUSED_FROM.get(g[0].device.type, FUSED_FROM['cpu'])
    fused = [passes and gi.numel() >= fused_from and _fusable(pi, gi, ga) for pi, gi, ga in zip(p, g, grad_avg)]
    eager = [i for i, f in enumerate(fused) if not f]
    eager_g, eager_avg = [g[i] for i in eager], [grad_avg[i] for i in eager]
    if eager: torch._foreach_lerp_(eager_avg, eager_g, 1 - mom)
    updates = torch._foreach_lerp(eager_g, eager_avg, mom) if nesterov and eager else eager_avg
    if sharded: updates = whole.gather(updates)  # every param is eager then
    matrices = dict(zip(eager, map(as_matrix, updates)))
    c = device_tensor(AVERAGE.values({'damp': 1 - mom, 'mom': mom}), coefficient_dtype(g[0].dtype),
                      g[0].device) if passes else None
    def fill(i, out):
        if fused[i]: run_flat(first, [g[i].view(-1), grad_avg[i].view(-1), out.view(-1)], c)
        else: out.copy_(matrices[i])
    # The fused matrices' shapes as stand-ins that hold no memory: orthogonalize reads their shapes.
    shapes = [matrices[i] if i in matrices else gi.new_empty((1, 1)).expand(matrix_shape(gi)) for i, gi in enumerate(g)]
    ortho = orthogonalize(shapes, ns_steps, ns_dtype, ns_method, fill)
    if sharded: ortho = whole.shards([o.reshape(u.shape) for o, u in zip(ortho, updates)])
    if decay is not None and eager: torch._foreach_mul_([p[i] for i in eager], [factors[i] for i in eager])
    for pi, o, m, f, fuse in zip(p, ortho, shapes, factors, fused):
        alpha = -adjusted_lr(lr, m.shape, adjust_lr)  # the whole matrix's shape
        if fuse: run_flat(_apply_update, [pi.view(-1), o.view(-1)],
                          device_tensor(MOVE.values({'factor': f, 'alpha': alpha}), c.dtype, c.device))
        elif pi.is_contiguous(): pi.view(o.shape).add_(o, alpha=alpha)  # as a matrix
        else: pi.add_(o.reshape(pi.shape), alpha=alpha)


# Unchunked: its batches of equal shapes span the whole bucket.
declare(hypers={'ns_method': choice(*NS_METHODS), 'adjust_lr': choice(*ADJUSTMENTS), 'ns_steps': count(1, 100)},
        unchunked=True, accumulation="Muon orthogonalises its Nesterov mix of momentum and gradient, and optimizer "
                                     "accumulation keeps no gradient")(muon_step)
fused_muon_step = partial(muon_step, compiled=True)


class DefaultRoute:
    "The default route (see the module docstring): params of 2 dims or more, but `head`."
    def __init__(self, head): self.head = head
    def __call__(self, p) -> bool: return p.ndim >= 2 and p is not self.head


def default_route(groups: list[list[torch.Tensor]]) -> Callable[[torch.Tensor], bool]:
    "The default route for the param groups `groups`: the head is the last param of 2 dims or more of the last."
    return DefaultRoute(next((p for p in reversed(groups[-1]) if p.ndim >= 2), None) if groups else None)


def muon_stepper(p, lr, mom, sqr_mom, eps, nesterov, ns_steps, ns_dtype, ns_method, adjust_lr, muon=True, grad_avg=None,
                 **kwargs):
    "fastai-style stepper, one param, after the route's: the Muon step (the per-param reference of the tests)."
    if not muon: return {}
    g = p.grad.data
    if grad_avg is None: grad_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
    grad_avg.mul_(mom).add_(g, alpha=1 - mom)
    u = (1 - mom) * g + mom * grad_avg if nesterov else grad_avg
    m = as_matrix(u)
    ortho = orthogonalize_one(m, ns_steps, ns_dtype, ns_method)
    p.data.view(m.shape).add_(ortho, alpha=-adjusted_lr(lr, m.shape, adjust_lr))
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
                ns_dtype=torch.bfloat16, ns_method='gram', adjust_lr='match_rms_adamw', route=None):
    "Muon as fastai would write it: a fastai `Optimizer` of per-param steppers, AdamW for the routed-out params."
    adam = [partial(average_grad, dampening=True), average_sqr_grad, step_stat]
    from fastai.optimizer import adam_step as fastai_adam_step
    cbs = [weight_decay if decouple_wd else l2_reg, *map(_AdamPart, adam + [fastai_adam_step]), muon_stepper]
    return _RoutedNativeMuon(params, cbs, route, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, nesterov=nesterov,
                             ns_steps=ns_steps, ns_dtype=ns_dtype, ns_method=ns_method, adjust_lr=adjust_lr)


class MuonForEachOptimizer(ForEachOptimizer):
    """Muon for the params `route` picks (see the module docstring), AdamW for the others, in one optimizer
    whose hypers both share (`lr`, `mom`, `wd`; `sqr_mom` and `eps` are AdamW's). "foreach": matrices of
    the same shape are orthogonalised together in batched matmuls. `fused=True`: PyTorch's fused AdamW for
    the AdamW params; the Muon step is its batched matmuls either way."""
    def __init__(self, params, lr, mom=0.95, sqr_mom=0.95, eps=1e-8, wd=0.1, decouple_wd=True, nesterov=True,
                 ns_steps=5, ns_dtype=torch.bfloat16, ns_method='gram', adjust_lr='match_rms_adamw', route=None, *,
                 fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, muon_step, decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format,
                         fastai=native_muon, fastai_options={'route': route}, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps,
                         wd=wd, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, ns_method=ns_method,
                         adjust_lr=adjust_lr)
        self.route = route or default_route([list(pg) for pg in self.param_lists])
        # Muon's rule for the matrices the route picks, AdamW's (PyTorch's fused kernel with `fused=True`) for the rest.
        self.core.routes = [Route(StepRule.of(fused_muon_step) if fused else self.core.rule, None, self.takes_muon),
                            Route.of(fused_adam_step if fused else adam_step, self.takes_adamw)]

    def takes_muon(self, p, state: dict | None = None) -> bool:
        "Whether `p` takes Muon steps: its state's `muon` flag when set, else the route."
        state = state if state is not None else self.state[p] if p in self.state else {}
        return bool(state.get('muon', self.route(p)))

    def takes_adamw(self, p, state: dict) -> bool: return not self.takes_muon(p, state)

    def _step_all(self, only=None):
        "The route written in the state of each param the first time it steps: copies and checkpoints keep it."
        for pg in self.param_lists:
            for p in pg:
                if p.grad is not None and 'muon' not in self.state[p]: self.state[p]['muon'] = self.route(p)
        super()._step_all(only)
