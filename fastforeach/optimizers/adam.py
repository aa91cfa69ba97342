"Adam, AdamW (decoupled weight decay) and the pieces the Adam family shares."
import torch

from ..ops import mul_scalar_, add_scalar_
from ..engine import ForEachOptimizer, debias

__all__ = ['AdamForEachOptimizer', 'adam_step', 'average_grads', 'debiased_rms']


def average_grads(g, grad_avg, sqr_avg, *, mom, sqr_mom):
    "grad_avg ← mom·grad_avg + (1 − mom)·g;  sqr_avg ← sqr_mom·sqr_avg + (1 − sqr_mom)·g²"
    torch._foreach_lerp_(grad_avg, g, 1 - mom)
    mul_scalar_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, g, g, 1 - sqr_mom)


def debiased_rms(sqr_avg, *, step, sqr_mom, eps):
    "A new list: √(sqr_avg / debias2) + eps."
    denom = torch._foreach_div(sqr_avg, debias(sqr_mom, 1 - sqr_mom, step))
    torch._foreach_sqrt_(denom)
    if eps: add_scalar_(denom, eps)
    return denom


def adam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps):
    "p ← p − lr · (grad_avg / debias1) / (√(sqr_avg / debias2) + eps), after `average_grads`"
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps)
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr / debias(mom, 1 - mom, step))


class AdamForEachOptimizer(ForEachOptimizer):
    "fastai's `Adam` as one foreach step: AdamW with `decouple_wd=True`, Adam with L2 otherwise."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True):
        super().__init__(params, adam_step, decouple_wd=decouple_wd,
                         lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
