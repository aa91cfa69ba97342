"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm"): averages of the gradient, of its
difference from the previous one, and of the square of their Nesterov mix."""
from functools import partial

import torch
from fastai.optimizer import Optimizer, l2_reg, step_stat

from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import Coefficients, CompiledStep
from ..ops import mul_scalar_
from ..rules import FRACTION, StateSpec, declare
from .adam import debiased_rms

__all__ = ['AdanForEachOptimizer', 'adan_step', 'fused_adan_step', 'adan_stepper', 'native_adan']


def adan_step(p, g, grad_avg, diff_avg, sqr_avg, prev_grad, *, step, lr, beta1, beta2, beta3, eps, decay=None):
    """d = g − prev_grad (0 on the first step);  grad_avg, diff_avg, sqr_avg: averages with beta1, beta2,
    beta3 of g, d and (g + beta2·d)²;  prev_grad ← g;
    p ← (p − lr·(grad_avg / debias1 + beta2·diff_avg / debias2) / (√(sqr_avg / debias3) + eps)) / (1 + lr·wd)
    (decoupled weight decay in the paper's proximal form: `decay` is wd per param)."""
    if step == 1: torch._foreach_copy_(prev_grad, g)
    diff = torch._foreach_sub(g, prev_grad)
    torch._foreach_lerp_(grad_avg, g, 1 - beta1)
    torch._foreach_lerp_(diff_avg, diff, 1 - beta2)
    mixed = diff  # g + beta2·d, over d's buffer
    mul_scalar_(mixed, beta2)
    torch._foreach_add_(mixed, g)
    mul_scalar_(sqr_avg, beta3)
    torch._foreach_addcmul_(sqr_avg, mixed, mixed, 1 - beta3)
    torch._foreach_copy_(prev_grad, g)
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=beta3, eps=eps)
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr / debias(beta1, 1 - beta1, step))
    torch._foreach_addcdiv_(p, diff_avg, denom, -lr * beta2 / debias(beta2, 1 - beta2, step))
    if decay is not None and any(decay): torch._foreach_div_(p, [1 + lr * wd for wd in decay])


# The previous gradient is what the next difference is taken from, not an average: kept in full precision.
declare(state={'prev_grad': StateSpec(average=False)}, hypers={'beta1': FRACTION, 'beta2': FRACTION, 'beta3': FRACTION},
        accumulation="Adan's averages take the difference between consecutive gradients, which optimizer "
                     "accumulation does not keep")(adan_step)


# damp: 1 − beta; after_first: 0 on the first step and 1 after. Its own decay: `decay` is the decoupled wd.
ADAN = Coefficients('lr', 'damp1', 'damp2', 'beta2', 'beta3', 'damp3', 'inv_debias1', 'inv_debias2', 'inv_debias3',
                    'eps', 'after_first')


def adan_update(p, g, grad_avg, diff_avg, sqr_avg, prev_grad, c):
    """One tensor of `adan_step`. It does its own weight decay: L2 into the gradient, or the proximal decay
    after the step."""
    g = g + c[ADAN.l2] * p
    decay = 1 + c[ADAN.lr] * c[ADAN.decay]
    diff = (g - prev_grad) * c[ADAN.after_first]
    grad_avg.add_(c[ADAN.damp1] * (g - grad_avg))
    diff_avg.add_(c[ADAN.damp2] * (diff - diff_avg))
    mixed = g + c[ADAN.beta2] * diff
    sqr_avg.mul_(c[ADAN.beta3]).add_(c[ADAN.damp3] * mixed * mixed)
    prev_grad.copy_(g)
    p.sub_(c[ADAN.lr] * (grad_avg * c[ADAN.inv_debias1] + c[ADAN.beta2] * c[ADAN.inv_debias2] * diff_avg)
           / ((sqr_avg * c[ADAN.inv_debias3]).sqrt() + c[ADAN.eps])).div_(decay)


def _coefficients(*, step, lr, beta1, beta2, beta3, eps):
    return dict(lr=lr, damp1=1 - beta1, damp2=1 - beta2, beta2=beta2, beta3=beta3, damp3=1 - beta3,
                inv_debias1=1 / debias(beta1, 1 - beta1, step), inv_debias2=1 / debias(beta2, 1 - beta2, step),
                inv_debias3=1 / debias(beta3, 1 - beta3, step), eps=eps, after_first=float(step > 1))


fused_adan_step = CompiledStep(adan_step, adan_update, _coefficients, ADAN, own_decay=True)


def adan_stepper(p, lr, beta1, beta2, beta3, eps, step, grad_avg=None, diff_avg=None, sqr_avg=None, prev_grad=None,
                 wd=0., do_wd=True, decouple_wd=True, **kwargs):
    "fastai-style stepper, one param: `adan_step`'s update (the per-param reference the tests hold it to)."
    g = p.grad.data
    if grad_avg is None:
        grad_avg, diff_avg, sqr_avg = (torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(3))
        prev_grad = g.clone()
    diff = g - prev_grad
    grad_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    diff_avg.mul_(beta2).add_(diff, alpha=1 - beta2)
    mixed = g + beta2 * diff
    sqr_avg.mul_(beta3).addcmul_(mixed, mixed, value=1 - beta3)
    prev_grad.copy_(g)
    denom = (sqr_avg / (1 - beta3 ** step)).sqrt() + eps
    p.data.addcdiv_(grad_avg, denom, value=-lr / (1 - beta1 ** step))
    p.data.addcdiv_(diff_avg, denom, value=-lr * beta2 / (1 - beta2 ** step))
    if decouple_wd and do_wd and wd: p.data.div_(1 + lr * wd)
    return {'grad_avg': grad_avg, 'diff_avg': diff_avg, 'sqr_avg': sqr_avg, 'prev_grad': prev_grad}


def native_adan(params, lr, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, wd=0.02, decouple_wd=True):
    "Adan as fastai would write it: a fastai `Optimizer` of per-param steppers."
    cbs = ([] if decouple_wd else [l2_reg]) + [step_stat, partial(adan_stepper, decouple_wd=decouple_wd)]
    return Optimizer(params, cbs, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, eps=eps, wd=wd)


class AdanForEachOptimizer(ForEachOptimizer):
    """Adan as one foreach step; `fused=True`: the compiled update. The paper's betas (its 1 − β's: 0.02,
    0.08, 0.01), weight decay, and decoupled decay in its proximal form, p / (1 + lr·wd) after the step."""
    def __init__(self, params, lr, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, wd=0.02, decouple_wd=True, *,
                 fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_adan_step if fused else adan_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native_adan, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3,
                         eps=eps, wd=wd)
