"QHAdam: quasi-hyperbolic Adam."
import fastai.optimizer as native
import torch

from ..ops import add_scalar_
from ..accumulation import refuses_accumulation
from ..engine import ForEachOptimizer, debias
from ..fused import CompiledStep
from .adam import average_grads, average_grads_update, averaging_coefficients

__all__ = ['QHAdamForEachOptimizer', 'qhadam_step', 'fused_qhadam_step']


def qhadam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, nu_1, nu_2, eps):
    """p ← p − lr · ((1 − ν₁)·g + ν₁·grad_avg/debias1) / (√((1 − ν₂)·g² + ν₂·sqr_avg/debias2) + eps)"""
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    numer = torch._foreach_mul(grad_avg, nu_1 / debias(mom, 1 - mom, step))
    torch._foreach_add_(numer, g, alpha=1 - nu_1)
    denom = torch._foreach_mul(sqr_avg, nu_2 / debias(sqr_mom, 1 - sqr_mom, step))
    torch._foreach_addcmul_(denom, g, g, 1 - nu_2)
    torch._foreach_sqrt_(denom)
    add_scalar_(denom, eps)
    torch._foreach_addcdiv_(p, numer, denom, -lr)


refuses_accumulation(qhadam_step, "QHAdam's step mixes the gradient itself, (1 − nu_1)·g, into its numerator")


def qhadam_update(p, g, grad_avg, sqr_avg, c):
    """One tensor of `qhadam_step`; c = averaging coefficients, then lr, ν₁ / debias1, 1 − ν₁, ν₂ / debias2,
    1 − ν₂, eps."""
    average_grads_update(g, grad_avg, sqr_avg, c)
    numer = c[8] * g + c[7] * grad_avg
    denom = (c[10] * g * g + c[9] * sqr_avg).sqrt() + c[11]
    p.sub_(c[6] * numer / denom)


def _coefficients(*, step, lr, mom, sqr_mom, nu_1, nu_2, eps):
    *averaging, inv_debias1, inv_debias2 = averaging_coefficients(mom, sqr_mom, step)
    return [*averaging, inv_debias1, inv_debias2, lr, nu_1 * inv_debias1, 1 - nu_1, nu_2 * inv_debias2, 1 - nu_2, eps]


fused_qhadam_step = CompiledStep(qhadam_step, qhadam_update, _coefficients)


class QHAdamForEachOptimizer(ForEachOptimizer):
    "fastai's `QHAdam` as one foreach step; `fused=True`: the compiled update."
    def __init__(self, params, lr, mom=0.999, sqr_mom=0.999, nu_1=0.7, nu_2=1.0, eps=1e-8, wd=0., decouple_wd=True,
                 *, fused=False, rounding='kahan', kahan_dtype=torch.float32):
        super().__init__(params, fused_qhadam_step if fused else qhadam_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, fastai=native.QHAdam, lr=lr, mom=mom, sqr_mom=sqr_mom, nu_1=nu_1,
                         nu_2=nu_2, eps=eps, wd=wd)
