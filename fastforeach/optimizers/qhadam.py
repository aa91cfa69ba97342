"QHAdam: quasi-hyperbolic Adam."
import fastai.optimizer as native
import torch

from ..ops import add_scalar_
from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import CompiledStep
from ..rules import CLOSED_FRACTION, declare
from .adam import AVERAGING, average_grads, average_grads_update, averaging_coefficients

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


declare(hypers={'nu_1': CLOSED_FRACTION, 'nu_2': CLOSED_FRACTION},
        accumulation="QHAdam's step mixes the gradient itself, (1 − nu_1)·g, into its numerator")(qhadam_step)


# nu_1_debiased: ν₁ / debias1, g_share: 1 − ν₁, nu_2_debiased: ν₂ / debias2, g2_share: 1 − ν₂.
QHADAM = AVERAGING.extend('lr', 'nu_1_debiased', 'g_share', 'nu_2_debiased', 'g2_share', 'eps')


def qhadam_update(p, g, grad_avg, sqr_avg, c):
    "One tensor of `qhadam_step`."
    average_grads_update(g, grad_avg, sqr_avg, c)
    numer = c[QHADAM.g_share] * g + c[QHADAM.nu_1_debiased] * grad_avg
    denom = (c[QHADAM.g2_share] * g * g + c[QHADAM.nu_2_debiased] * sqr_avg).sqrt() + c[QHADAM.eps]
    p.sub_(c[QHADAM.lr] * numer / denom)


def _coefficients(*, step, lr, mom, sqr_mom, nu_1, nu_2, eps):
    averaging = averaging_coefficients(mom, sqr_mom, step)
    return {**averaging, 'lr': lr, 'nu_1_debiased': nu_1 * averaging['inv_debias1'], 'g_share': 1 - nu_1,
            'nu_2_debiased': nu_2 * averaging['inv_debias2'], 'g2_share': 1 - nu_2, 'eps': eps}


fused_qhadam_step = CompiledStep(qhadam_step, qhadam_update, _coefficients, QHADAM)


class QHAdamForEachOptimizer(ForEachOptimizer):
    "fastai's `QHAdam` as one foreach step; `fused=True`: the compiled update."
    def __init__(self, params, lr, mom=0.999, sqr_mom=0.999, nu_1=0.7, nu_2=1.0, eps=1e-8, wd=0., decouple_wd=True,
                 *, fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_qhadam_step if fused else qhadam_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native.QHAdam, lr=lr, mom=mom, sqr_mom=sqr_mom, nu_1=nu_1,
                         nu_2=nu_2, eps=eps, wd=wd)
