"RAdam, and SAdam through `beta`."
import math

import fastai.optimizer as native
import torch
import torch.nn.functional as F

from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import CompiledStep
from ..accumulation import Accumulation
from ..rules import AT_LEAST_ZERO, declare
from .adam import ADAM_AVERAGES, AVERAGING, average_grads, average_grads_update, averaging_coefficients, debiased_rms

__all__ = ['RAdamForEachOptimizer', 'radam_step', 'rectification', 'fused_radam_step', 'torch_radam_step',
           'fused_torch_radam_step']


def rectification(sqr_mom: float, step: int):
    "RAdam's variance rectification factor at `step`, or None while the variance estimate is too young (r ≤ 5)."
    r_inf = 2 / (1 - sqr_mom) - 1
    r = r_inf - 2 * step * sqr_mom**step / (1 - sqr_mom**step)
    if r <= 5: return None
    return math.sqrt(((r - 4) * (r - 2) * r_inf) / ((r_inf - 4) * (r_inf - 2) * r))


def radam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps, beta):
    """Rectified: p ← p − lr·v · (grad_avg / debias1) / denom, denom = √(sqr_avg / debias2) + eps,
    then softplus(denom, beta) when beta > 0 (SAdam). Early steps: p ← p − lr · grad_avg / debias1."""
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    radam_move(p, grad_avg, sqr_avg, step=step, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, beta=beta)


def radam_move(p, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps, beta):
    "`radam_step`'s move of the params, from its averages."
    debias1 = debias(mom, 1 - mom, step)
    v = rectification(sqr_mom, step)
    if v is None:
        torch._foreach_add_(p, grad_avg, alpha=-lr / debias1)
        return
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps)
    if beta: denom = [F.softplus(d, beta) for d in denom]
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr * v / debias1)


declare(hypers={'beta': AT_LEAST_ZERO}, accumulation=Accumulation(ADAM_AVERAGES, radam_move))(radam_step)


def _torch_eps(eps, sqr_mom, step):
    "torch.optim.RAdam's eps in fastai's form: torch adds eps to √sqr_avg before debiasing, fastai after."
    return eps / math.sqrt(1 - sqr_mom**step) if sqr_mom else eps


def torch_radam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps):
    """torch.optim.RAdam: `radam_step` with the rectified denominator (√sqr_avg + eps) / √debias2, that is
    eps / √debias2 in fastai's √(sqr_avg / debias2) + eps."""
    radam_step(p, g, grad_avg, sqr_avg, step=step, lr=lr, mom=mom, sqr_mom=sqr_mom,
               eps=_torch_eps(eps, sqr_mom, step), beta=0.)


declare(accumulation="torch's RAdam is held to torch.optim.RAdam, which has no optimizer accumulation")(torch_radam_step)


def softplus(x, beta, threshold=20.):
    "`F.softplus(x, beta)` for a tensor `beta > 0`: log(1 + exp(beta·x)) / beta, or x where beta·x > threshold."
    return torch.where(x * beta > threshold, x, torch.log1p(torch.exp(x * beta)) / beta)


# step_size: lr·v / debias1, or lr / debias1 before rectification starts; rectified: 1 or 0.
RADAM = AVERAGING.extend('step_size', 'eps', 'rectified', 'beta')


def _rectified_update(p, grad_avg, sqr_avg, c, smooth):
    denom = (sqr_avg * c[RADAM.inv_debias2]).sqrt() + c[RADAM.eps]
    if smooth: denom = softplus(denom, c[RADAM.beta])
    p.sub_(c[RADAM.step_size] * torch.where(c[RADAM.rectified] > 0, grad_avg / denom, grad_avg))


def radam_update(p, g, grad_avg, sqr_avg, c):
    "One tensor of `radam_step` with beta = 0."
    average_grads_update(g, grad_avg, sqr_avg, c)
    _rectified_update(p, grad_avg, sqr_avg, c, smooth=False)


def sadam_update(p, g, grad_avg, sqr_avg, c):
    "One tensor of `radam_step` with beta > 0 (SAdam): the denominator goes through softplus."
    average_grads_update(g, grad_avg, sqr_avg, c)
    _rectified_update(p, grad_avg, sqr_avg, c, smooth=True)


def _coefficients(*, step, lr, mom, sqr_mom, eps, beta):
    averaging, v = averaging_coefficients(mom, sqr_mom, step), rectification(sqr_mom, step)
    return {**averaging, 'step_size': lr * (1 if v is None else v) * averaging['inv_debias1'], 'eps': eps,
            'rectified': v is not None, 'beta': beta}


def _choose_update(hypers):
    "Softplus costs an exp and a log per element: only SAdam's update has it."
    return sadam_update if hypers['beta'] else radam_update


fused_radam_step = CompiledStep(radam_step, radam_update, _coefficients, RADAM, choose=_choose_update)


def _torch_coefficients(*, step, lr, mom, sqr_mom, eps):
    return _coefficients(step=step, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=_torch_eps(eps, sqr_mom, step), beta=0.)


fused_torch_radam_step = CompiledStep(torch_radam_step, radam_update, _torch_coefficients, RADAM)


class RAdamForEachOptimizer(ForEachOptimizer):
    "fastai's `RAdam` as one foreach step (SAdam with `beta > 0`); `fused=True`: the compiled update."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., beta=0., decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_radam_step if fused else radam_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native.RAdam, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd,
                         beta=beta)
