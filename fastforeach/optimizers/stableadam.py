"""StableAdam (StableAdamW, Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models"): AdamW whose step size is clipped, per tensor, by the RMS of g² / v̂ (the update
clipping of AdaFactor), in place of gradient clipping."""
from functools import partial

import torch
from fastai.optimizer import Optimizer, average_grad, average_sqr_grad, l2_reg, step_stat

from ..fastai import ForEachOptimizer
from ..ops import debias, device_tensor
from ..fused import CompiledStep, PackStep, run_flat
from ..rules import declare
from .adam import ADAM, adam_coefficients, adam_direction, average_grads, average_grads_update, debiased_rms

__all__ = ['StableAdamForEachOptimizer', 'stable_adam_step', 'fused_stable_adam_step', 'stable_adam_stepper',
           'native_stable_adam']


def stable_adam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps, norms, decay=None):
    """Adam's averages;  s = 1 / max(1, rms(g / √max(sqr_avg / debias2, eps²)));
    p ← p·(1 − s·lr·wd) − s·lr·(grad_avg / debias1) / (√(sqr_avg / debias2) + eps)
    (`decay`: wd per param, when weight decay is decoupled: scaled by s as the step is)."""
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    v_hat = torch._foreach_div(sqr_avg, debias(sqr_mom, 1 - sqr_mom, step))
    torch._foreach_clamp_min_(v_hat, eps * eps)
    torch._foreach_sqrt_(v_hat)
    scale = norms.rms(torch._foreach_div(g, v_hat)).clamp_min(1).reciprocal()
    if decay is not None and any(decay):
        wds = device_tensor(decay, scale.dtype, scale.device)
        torch._foreach_mul_(p, (1 - lr * wds * scale).unbind())
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps)
    update = torch._foreach_div(grad_avg, denom)
    torch._foreach_addcmul_(p, update, (-lr / debias(mom, 1 - mom, step) * scale).unbind())


declare(accumulation="StableAdam clips each step by the RMS of the gradient itself over its average of squares, "
                     "and optimizer accumulation keeps no gradient")(stable_adam_step)


# Compiled: both passes get all of c. The decay factor is 1 − lr·wd (or 1): the step's own decay is
# 1 − (1 − decay)·s.
STABLE_ADAM = ADAM.extend('eps_sqr')

def _clip_ratio(p, g, grad_avg, sqr_avg, c):
    "L2 into the gradient, Adam's averages, then g / √max(v̂, eps²): what the clipping RMS is taken over."
    g = g + c[STABLE_ADAM.l2] * p
    average_grads_update(g, grad_avg, sqr_avg, c)
    return g / (sqr_avg * c[STABLE_ADAM.inv_debias2]).clamp_min(c[STABLE_ADAM.eps_sqr]).sqrt()


def stable_adam_rms(p, g, grad_avg, sqr_avg, c):
    "First pass of one tensor: the averages, and the RMS that clips the step (1-d)."
    return (torch.stack((_clip_ratio(p, g, grad_avg, sqr_avg, c).pow(2).mean().sqrt(),)),)


def stable_adam_apply(p, grad_avg, sqr_avg, rms, c):
    "Second pass: the decay and the step, both scaled by s = 1 / max(1, rms)."
    # rms[0], a 0-d value: with sizes traced as symbols, the 1-d `rms` would be broadcast as if it could be
    # as long as p, and read out of its bounds.
    stable_adam_scale(p, grad_avg, sqr_avg, 1 / rms[0].clamp_min(1), c)


def stable_adam_ratio(p, g, grad_avg, sqr_avg, out, c):
    "First pass over a pack: the averages, and g / √max(v̂, eps²) written to `out`."
    out.copy_(_clip_ratio(p, g, grad_avg, sqr_avg, c))


def stable_adam_scale(p, grad_avg, sqr_avg, scale, c):
    "Second pass (over a pack, with each param's s given per element): the decay and the step, scaled by s."
    p.mul_(1 - (1 - c[STABLE_ADAM.decay]) * scale).sub_(c[STABLE_ADAM.lr] * scale * adam_direction(grad_avg, sqr_avg, c))


def _step_pack(pack, c, l2, norms, rounding=None):
    ratio, comps = pack.scratch(), [pack.flat_comp] if pack.flat_comp is not None else []
    run_flat(stable_adam_ratio, [pack.flat_p, pack.flat_g, *pack.flat_states, ratio, *comps], c, rounding, writes=False)
    scale = pack.rms(ratio, whole=norms).clamp_min(1).reciprocal()
    run_flat(stable_adam_scale, [pack.flat_p, *pack.flat_states, pack.spread(scale), *comps], c, rounding, writes=True)


def _coefficients(*, step, lr, mom, sqr_mom, eps):
    return {**adam_coefficients(step=step, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps), 'eps_sqr': eps * eps}


# Two compiled passes: the RMS over a whole tensor must be complete before any of it moves.
fused_stable_adam_step = CompiledStep(
    stable_adam_step, stable_adam_rms, _coefficients, STABLE_ADAM, then=stable_adam_apply,
    pack_step=PackStep(_step_pack, ((stable_adam_ratio, 0, False), (stable_adam_scale, 1, True))))


def stable_adam_stepper(p, lr, mom, sqr_mom, eps, step, grad_avg, sqr_avg, wd=0., do_wd=True, decouple_wd=True,
                        **kwargs):
    "fastai-style stepper, one param, after fastai's averages: `stable_adam_step`'s decay and step."
    v_hat = sqr_avg / (1 - sqr_mom ** step)
    rms = (p.grad.data.pow(2) / v_hat.clamp_min(eps * eps)).mean().sqrt().item()
    lr = lr / max(1., rms)
    if decouple_wd and do_wd and wd: p.data.mul_(1 - lr * wd)
    p.data.addcdiv_(grad_avg, v_hat.sqrt() + eps, value=-lr / (1 - mom ** step))
    return {}


def native_stable_adam(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=0.01, decouple_wd=True):
    "StableAdam as fastai would write it: a fastai `Optimizer` of per-param steppers (fastai's Adam averages)."
    cbs = ([] if decouple_wd else [l2_reg]) + [partial(average_grad, dampening=True), average_sqr_grad, step_stat,
                                               partial(stable_adam_stepper, decouple_wd=decouple_wd)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


class StableAdamForEachOptimizer(ForEachOptimizer):
    """StableAdam (AdamW with per-tensor update clipping) as one foreach step; `fused=True`: two compiled
    passes. Weight decay decoupled by default, scaled as the step is."""
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=0.01, decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_stable_adam_step if fused else stable_adam_step, decouple_wd=decouple_wd,
                         rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format, fastai=native_stable_adam, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
