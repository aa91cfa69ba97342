"SGD, with or without momentum."
import torch

from ..ops import mul_scalar_
from ..engine import ForEachOptimizer

__all__ = ['SGDForEachOptimizer', 'sgd_step', 'momentum_sgd_step']


def sgd_step(p, g, *, lr):
    "p ← p − lr·g"
    torch._foreach_add_(p, g, alpha=-lr)


def momentum_sgd_step(p, g, grad_avg, *, lr, mom):
    "grad_avg ← mom·grad_avg + g;  p ← p − lr·grad_avg"
    mul_scalar_(grad_avg, mom)
    torch._foreach_add_(grad_avg, g)
    torch._foreach_add_(p, grad_avg, alpha=-lr)


class SGDForEachOptimizer(ForEachOptimizer):
    "fastai's `SGD` as one foreach step; `mom` at construction picks plain or momentum SGD, as in fastai."
    def __init__(self, params, lr, mom=0., wd=0., decouple_wd=True):
        super().__init__(params, sgd_step if mom == 0 else momentum_sgd_step, decouple_wd=decouple_wd,
                         lr=lr, mom=mom, wd=wd)
