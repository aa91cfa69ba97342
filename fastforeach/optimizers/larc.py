"LARC (clipped) and LARS: SGD with a per-layer trust ratio."
from functools import partial

import fastai.optimizer as native
import torch

from ..ops import mul_scalar_
from ..fastai import ForEachOptimizer
from ..fused import Coefficients, CompiledStep, PackStep, run_flat
from ..rules import AT_LEAST_ZERO, declare

__all__ = ['LarcForEachOptimizer', 'larc_step', 'momentum_larc_step', 'layer_lrs', 'fused_larc_step']


def layer_lrs(p, g, *, lr, trust_coeff, wd, eps, clip, norms):
    """Every layer's lr at once: lr·trust_coeff·‖p‖ / (‖g‖ + wd·‖p‖ + eps), at most lr when `clip`, with the
    norms of whole params (`norms`, see `rules.StepRule`).

    A list of 0-d tensors, so nothing waits for the device."""
    p_norm, g_norm = norms(p, g)
    local_lr = lr * trust_coeff * p_norm / (g_norm + p_norm * wd + eps)
    if clip: local_lr = local_lr.clamp_max(lr)
    return local_lr.unbind()


def _layerwise_step(p, g, direction, **hypers):
    local_lr = layer_lrs(p, g, **hypers)
    torch._foreach_addcmul_(p, direction, [-lr for lr in local_lr])
    return {'local_lr': local_lr}


def larc_step(p, g, *, lr, trust_coeff, wd, eps, norms, clip=True):
    "p ← p − local_lr·g (see `layer_lrs`)"
    return _layerwise_step(p, g, g, lr=lr, trust_coeff=trust_coeff, wd=wd, eps=eps, clip=clip, norms=norms)


def momentum_larc_step(p, g, grad_avg, *, lr, mom, trust_coeff, wd, eps, norms, clip=True):
    "grad_avg ← mom·grad_avg + g;  p ← p − local_lr·grad_avg (see `layer_lrs`)"
    mul_scalar_(grad_avg, mom)
    torch._foreach_add_(grad_avg, g)
    return _layerwise_step(p, g, grad_avg, lr=lr, trust_coeff=trust_coeff, wd=wd, eps=eps, clip=clip, norms=norms)


for _rule in (larc_step, momentum_larc_step):
    declare(hypers={'trust_coeff': AT_LEAST_ZERO},
            accumulation="Larc's local lr divides by the norm of the gradient itself")(_rule)


# lr_trust: lr·trust_coeff; wd: the rule's own (in its local lr), beside the decay factors; clip: 1 or 0.
LARC = Coefficients('lr', 'lr_trust', 'wd', 'eps', 'clip', 'mom')


def _layer_lr(p_norm, g_norm, c):
    "`layer_lrs` from the norms (of one tensor, or 1-d of several)."
    local_lr = c[LARC.lr_trust] * p_norm / (g_norm + p_norm * c[LARC.wd] + c[LARC.eps])
    return torch.where(c[LARC.clip] > 0, torch.minimum(local_lr, c[LARC.lr]), local_lr)


def larc_update(p, g, c):
    "One tensor of `larc_step`; returns its `local_lr`."
    local_lr = _layer_lr(p.norm(), g.norm(), c)
    p.sub_(local_lr * g)
    return (local_lr,)


def momentum_larc_update(p, g, grad_avg, c):
    "One tensor of `momentum_larc_step`; returns its `local_lr`."
    grad_avg.mul_(c[LARC.mom]).add_(g)
    local_lr = _layer_lr(p.norm(), g.norm(), c)
    p.sub_(local_lr * grad_avg)
    return (local_lr,)


# A pack's params (see `fused.Pack`): L2 when there is any, norms of every param at once, then each
# element moved by its param's local_lr. Decoupled decay is done with the move: ‖decay·p‖ is |decay|·‖p‖,
# so it needs no pass of its own.

def l2_update(p, g, out, c):
    "out ← g + wd·p: L2 as a phase of its own, as the gradients' norms need it (the gradients are the params' own)."
    out.copy_(g + c[LARC.l2] * p)


def larc_apply(p, g, local_lr, c):
    "p ← decay·p − local_lr·g, with its param's local_lr given per element."
    p.mul_(c[LARC.decay]).sub_(local_lr * g)


def momentum_larc_apply(p, g, grad_avg, local_lr, c):
    "grad_avg ← mom·grad_avg + g;  p ← decay·p − local_lr·grad_avg, with its param's local_lr given per element."
    grad_avg.mul_(c[LARC.mom]).add_(g)
    p.mul_(c[LARC.decay]).sub_(local_lr * grad_avg)


def _step_pack(pack, c, l2, norms, rounding, apply):
    g, comps = pack.flat_g, [pack.flat_comp] if pack.flat_comp is not None else []
    if l2:
        g = pack.scratch()
        run_flat(l2_update, [pack.flat_p, pack.flat_g, g, *comps], c, rounding, writes=False)
    p_norm, g_norm = pack.norms(pack.flat_p, g, whole=norms)
    local_lr = _layer_lr(c[LARC.decay].abs() * p_norm, g_norm, c)
    run_flat(apply, [pack.flat_p, g, *pack.flat_states, pack.spread(local_lr), *comps], c, rounding, writes=True)
    return [(lr,) for lr in pack.per_param('local_lr', local_lr)]


def _coefficients(*, lr, trust_coeff, wd, eps, mom=0., clip):
    return dict(lr=lr, lr_trust=lr * trust_coeff, wd=wd, eps=eps, clip=clip, mom=mom)


def fused_larc_step(mom: float, clip: bool) -> CompiledStep:
    "The compiled `larc_step` (mom = 0) or `momentum_larc_step`, clipped or not."
    rule, update, apply = ((larc_step, larc_update, larc_apply) if mom == 0 else
                           (momentum_larc_step, momentum_larc_update, momentum_larc_apply))
    pack_step = PackStep(partial(_step_pack, apply=apply), ((l2_update, 0, False), (apply, 1, True)))
    return CompiledStep(partial(rule, clip=clip), update, partial(_coefficients, clip=clip), LARC, returns=('local_lr',),
                        pack_step=pack_step, chunk=1)


class LarcForEachOptimizer(ForEachOptimizer):
    """fastai's `Larc` as one foreach step: LARC with `clip=True`, LARS with `clip=False`;
    `fused=True`: the compiled update."""
    def __init__(self, params, lr, mom=0.9, clip=True, trust_coeff=0.02, eps=1e-8, wd=0., decouple_wd=True, *,
                 fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        rule = fused_larc_step(mom, clip) if fused else partial(larc_step if mom == 0 else momentum_larc_step, clip=clip)
        super().__init__(params, rule, decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format,
                         fastai=native.Larc, fastai_options={'clip': clip},
                         lr=lr, mom=mom, trust_coeff=trust_coeff, eps=eps, wd=wd)
