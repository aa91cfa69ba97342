"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"), as
torch.optim.Adafactor does it: a second moment factored into a row and a column average for every param of
2 dims or more (O(rows + columns) state, over its last two dims), a full one for the others; no momentum;
a relative step size; each update clipped by its RMS.

Two rules, routed by the param's dims (`Routed`): `adafactor_factored_step` keeps `row_var` (shaped like
the param with its last dim 1) and `col_var` (its second-to-last dim 1), `adafactor_step` keeps
`variance`, shaped like the param: torch's state keys and shapes.
"""
from dataclasses import replace
from functools import partial

import torch
from fastai.optimizer import Optimizer, l2_reg, step_stat

from ..core import Routed
from ..fastai import ForEachOptimizer
from ..fused import Coefficients
from ..fused.tensorwise import TensorwiseStep
from ..rules import AT_LEAST_ZERO, COLUMNS, ROWS, Check, StateSpec, declare

__all__ = ['AdafactorForEachOptimizer', 'adafactor_step', 'adafactor_factored_step', 'fused_adafactor_step',
           'fused_adafactor_factored_step', 'ADAFACTOR_STEPS', 'factored', 'not_factored', 'native_adafactor']

# torch's shapes: kept dims of size 1, so that row_var ⊗ col_var is their product.
ROW_VAR, COL_VAR = replace(ROWS, nonnegative=True), replace(COLUMNS, nonnegative=True)
HYPERS = {'beta2_decay': Check(lambda v: v <= 0, '<= 0'), 'eps1': Check(lambda v: v >= 0, '>= 0', named='auto'),
          'eps2': AT_LEAST_ZERO, 'd': Check(lambda v: v >= 1, '>= 1')}
NO_ACCUMULATION = "Adafactor's update is the gradient itself over its RMS, which optimizer accumulation does not keep"


def factored(p, state=None) -> bool:
    "Whether `p` keeps a factored second moment: 2 dims or more."
    return p.ndim >= 2


def not_factored(p, state=None) -> bool: return p.ndim < 2


def floor_of(eps1, dtype: torch.dtype) -> float:
    "eps1, the floor of the row averages' mean and of √(second moment): 'auto' is `dtype`'s machine epsilon."
    return torch.finfo(dtype).eps if eps1 == 'auto' else eps1


@declare(state={'variance': StateSpec(nonnegative=True)}, hypers=HYPERS, accumulation=NO_ACCUMULATION)
def adafactor_step(p, g, variance, *, step, lr, beta2_decay, eps1, eps2, d, norms, decay=None):
    """variance ← lerp(variance, g², stepᵝ) (β = beta2_decay);  then `adafactor_move` with it."""
    torch._foreach_lerp_(variance, torch._foreach_mul(g, g), step ** beta2_decay)
    floor = floor_of(eps1, p[0].dtype)
    adafactor_move(p, g, torch._foreach_clamp_min(variance, floor * floor), step=step, lr=lr, eps2=eps2, d=d,
                   norms=norms, decay=decay)


@declare(state={'row_var': ROW_VAR, 'col_var': COL_VAR}, hypers=HYPERS, accumulation=NO_ACCUMULATION)
def adafactor_factored_step(p, g, row_var, col_var, *, step, lr, beta2_decay, eps1, eps2, d, norms, whole, decay=None):
    """row_var ← lerp(row_var, mean of g² over each row, stepᵝ);  col_var ← the same over each column;
    v = row_var ⊗ col_var / max(mean(row_var), eps1);  then `adafactor_move` with v. (Means over a dim
    that FSDP2 shards are completed across ranks: `whole.means`.)"""
    rate, floor = step ** beta2_decay, floor_of(eps1, p[0].dtype)
    # g² once for both means. (torch's Adafactor squares a vector norm along the dim instead: on CPU, along
    # dim -2 of xresnet50's kernels, 16x slower than this whole step.)
    squares = torch._foreach_mul(g, g)
    torch._foreach_lerp_(row_var, whole.means(squares, -1), rate)
    torch._foreach_lerp_(col_var, whole.means(squares, -2), rate)
    del squares
    estimates = [torch.mul(rows, cols).div_(mean.clamp_min(floor))
                 for rows, cols, mean in zip(row_var, col_var, whole.means(row_var, -2))]
    torch._foreach_clamp_min_(estimates, floor * floor)
    adafactor_move(p, g, estimates, step=step, lr=lr, eps2=eps2, d=d, norms=norms, decay=decay)


def adafactor_move(p, g, v, *, step, lr, eps2, d, norms, decay=None):
    """α = max(eps2, RMS(p))·min(lr, 1/√step), RMS(p) before weight decay;  p ← p·(1 − lr·wd) (decoupled);
    u = g / √v;  p ← p − α·u / max(1, RMS(u)/d). `v` (clamped to eps1² already) is used up."""
    alpha = norms.rms(p).clamp_min(eps2) * min(lr, step ** -0.5)
    if decay is not None and any(decay): torch._foreach_mul_(p, [1 - lr * wd for wd in decay])
    torch._foreach_rsqrt_(v)
    torch._foreach_mul_(v, g)
    scale = alpha / (norms.rms(v) / d).clamp_min(1)
    torch._foreach_mul_(v, scale.neg().unbind())
    torch._foreach_add_(p, v)


# Compiled, one param at a time (`TensorwiseStep`).
ADAFACTOR = Coefficients('rate', 'rho', 'floor', 'floor_sqr', 'eps2', 'inv_d')


def _moved(p, g, v, c):
    "One param of `adafactor_move`, after L2 (in `g`), v not yet clamped."
    alpha = p.square().mean().sqrt().clamp_min(c[ADAFACTOR.eps2]) * c[ADAFACTOR.rho]
    update = g * v.clamp_min(c[ADAFACTOR.floor_sqr]).rsqrt()
    scale = alpha / (update.square().mean().sqrt() * c[ADAFACTOR.inv_d]).clamp_min(1)
    p.mul_(c[ADAFACTOR.decay]).sub_(scale * update)


def adafactor_update(p, g, variance, c):
    "One param of `adafactor_step` (seen flat), weight decay included."
    g = g + c[ADAFACTOR.l2] * p
    variance.lerp_(g * g, c[ADAFACTOR.rate])
    _moved(p, g, variance, c)


def adafactor_factored_update(p, g, row_var, col_var, c):
    """One param of `adafactor_factored_step`, weight decay included: `p` and `g` seen as stacks of matrices,
    `row_var` as (stack, rows), `col_var` as (stack, columns)."""
    g = g + c[ADAFACTOR.l2] * p
    row_var.lerp_((g * g).mean(-1), c[ADAFACTOR.rate])
    col_var.lerp_((g * g).mean(-2), c[ADAFACTOR.rate])
    mean = row_var.mean(-1).clamp_min(c[ADAFACTOR.floor])
    _moved(p, g, row_var.unsqueeze(-1) * col_var.unsqueeze(-2) / mean.unsqueeze(-1).unsqueeze(-1), c)


def _coefficients(*, dtype, step, lr, beta2_decay, eps1, eps2, d):
    floor = floor_of(eps1, dtype)
    return dict(rate=step ** beta2_decay, rho=min(lr, step ** -0.5), floor=floor, floor_sqr=floor * floor, eps2=eps2,
                inv_d=1 / d)


fused_adafactor_step = TensorwiseStep(adafactor_step, adafactor_update, _coefficients, ADAFACTOR, ndim=1)
fused_adafactor_factored_step = TensorwiseStep(adafactor_factored_step, adafactor_factored_update, _coefficients,
                                               ADAFACTOR, ndim=3)
# The routes of an Adafactor optimizer, foreach (False) and fused (True).
ADAFACTOR_STEPS = {False: Routed(((adafactor_factored_step, factored), (adafactor_step, not_factored))),
                   True: Routed(((fused_adafactor_factored_step, factored), (fused_adafactor_step, not_factored)))}


def adafactor_stepper(p, lr, beta2_decay, eps1, eps2, d, step, wd=0., do_wd=True, decouple_wd=True, row_var=None,
                      col_var=None, variance=None, **kwargs):
    "fastai-style stepper, one param, after `step_stat`: torch.optim.Adafactor's step, written out plainly."
    g, floor = p.grad.data, floor_of(eps1, p.dtype)
    rate = step ** beta2_decay
    alpha = max(eps2, p.data.norm().item() / p.numel() ** 0.5) * min(lr, step ** -0.5)
    if decouple_wd and do_wd and wd: p.data.mul_(1 - lr * wd)
    if factored(p):
        if row_var is None: row_var, col_var = (torch.zeros(spec.shape_for(p), dtype=p.dtype) for spec in (ROW_VAR, COL_VAR))
        row_var.lerp_(g.pow(2).mean(-1, keepdim=True), rate)
        col_var.lerp_(g.pow(2).mean(-2, keepdim=True), rate)
        v, new = row_var @ col_var / row_var.mean(-2, keepdim=True).clamp(min=floor), {'row_var': row_var, 'col_var': col_var}
    else:
        if variance is None: variance = torch.zeros_like(p.data)
        variance.lerp_(g.pow(2), rate)
        v, new = variance.clone(), {'variance': variance}
    update = g * v.clamp(min=floor * floor).rsqrt()
    p.data.add_(update, alpha=-alpha / max(1., update.norm().item() / update.numel() ** 0.5 / d))
    return new


def native_adafactor(params, lr=1e-2, beta2_decay=-0.8, eps1='auto', eps2=1e-3, d=1., wd=0., decouple_wd=True):
    "Adafactor as fastai would write it: a fastai `Optimizer` of per-param steppers."
    cbs = ([] if decouple_wd else [l2_reg]) + [step_stat, partial(adafactor_stepper, decouple_wd=decouple_wd)]
    return Optimizer(params, cbs, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, wd=wd)


class AdafactorForEachOptimizer(ForEachOptimizer):
    """Adafactor as foreach steps, factored for params of 2 dims or more; `fused=True`: one compiled update
    per param. `eps1='auto'`: the machine epsilon of the dtype the update is computed in (float32 for 16-bit
    params, which fastforeach steps in float32). Weight decay decoupled by default, as torch's (which has no
    L2): p ← p·(1 − lr·wd), after the param's RMS is read."""
    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps1='auto', eps2=1e-3, d=1., wd=0., decouple_wd=True, *,
                 fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, ADAFACTOR_STEPS[fused], decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native_adafactor, lr=lr,
                         beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, wd=wd)
