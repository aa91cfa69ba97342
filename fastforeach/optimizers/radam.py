"RAdam, and SAdam through `beta`."
import math

import torch
import torch.nn.functional as F

from ..engine import ForEachOptimizer, debias
from .adam import average_grads, debiased_rms

__all__ = ['RAdamForEachOptimizer', 'radam_step', 'rectification']


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
    debias1 = debias(mom, 1 - mom, step)
    v = rectification(sqr_mom, step)
    if v is None:
        torch._foreach_add_(p, grad_avg, alpha=-lr / debias1)
        return
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps)
    if beta: denom = [F.softplus(d, beta) for d in denom]
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr * v / debias1)


class RAdamForEachOptimizer(ForEachOptimizer):
    "fastai's `RAdam` as one foreach step (SAdam with `beta > 0`)."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., beta=0., decouple_wd=True):
        super().__init__(params, radam_step, decouple_wd=decouple_wd,
                         lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=beta)
