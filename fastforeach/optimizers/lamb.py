"LAMB: Adam with a per-layer trust ratio."
import fastai.optimizer as native
import torch

from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import CompiledStep, PackStep, run_flat
from ..accumulation import Accumulation
from ..rules import declare
from .adam import (ADAM, ADAM_AVERAGES, adam_coefficients, adam_direction, average_grads, average_grads_update,
                   debiased_rms)

__all__ = ['LambForEachOptimizer', 'lamb_step', 'fused_lamb_step', 'trust_ratio']


def lamb_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps, norms):
    """u = (grad_avg / debias1) / (√(sqr_avg / debias2) + eps);  q = min(rms(p) / rms(u), 10), or 1 when
    either is 0;  p ← p − lr·q·u.  rms(p) / rms(u) is ‖p‖ / ‖u‖: both are means over the same elements."""
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    lamb_move(p, grad_avg, sqr_avg, step=step, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, norms=norms)


def lamb_move(p, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps, norms):
    "`lamb_step`'s move of the params, from its averages."
    update = torch._foreach_div(grad_avg, debias(mom, 1 - mom, step))
    torch._foreach_div_(update, debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps))
    torch._foreach_addcmul_(p, update, (-lr * trust_ratio(*norms(p, update))).unbind())


declare(accumulation=Accumulation(ADAM_AVERAGES, lamb_move))(lamb_step)


def trust_ratio(r1, r2):
    "min(r1 / r2, 10), or 1 where either is 0: for one tensor's rms, or elementwise over 1-d tensors of them."
    return torch.where((r1 == 0) | (r2 == 0), torch.ones_like(r1), (r1 / r2).clamp_max(10))


def lamb_norms(p, g, grad_avg, sqr_avg, c):
    """First pass of one tensor of `lamb_step`: L2 into the gradient, the averages, then rms of the decayed
    param (|decay|·rms(p), p itself is decayed in the second pass) and of the update. c is laid out as `ADAM`."""
    g = g + c[ADAM.l2] * p
    average_grads_update(g, grad_avg, sqr_avg, c)
    # One 1-d tensor, not two 0-d ones: dynamo would read 0-d inputs of the next pass as Python floats and
    # recompile whenever one turns NaN.
    return (torch.stack((c[ADAM.decay].abs() * p.pow(2).mean().sqrt(),
                         adam_direction(grad_avg, sqr_avg, c).pow(2).mean().sqrt())),)


def lamb_apply(p, grad_avg, sqr_avg, norms, c):
    "Second pass: p ← decay·p − lr·q·update, with the trust ratio q from the first pass's norms."
    p.mul_(c[ADAM.decay]).sub_(c[ADAM.lr] * trust_ratio(norms[0], norms[1]) * adam_direction(grad_avg, sqr_avg, c))


# A pack's params (see `fused.Pack`): the averages and every update, the norms of every param at once,
# then each element scaled by its param's trust ratio.

def lamb_direction(p, g, grad_avg, sqr_avg, out, c):
    "First pass over a pack: L2 into the gradient, the averages, then the update written to `out`."
    average_grads_update(g + c[ADAM.l2] * p, grad_avg, sqr_avg, c)
    out.copy_(adam_direction(grad_avg, sqr_avg, c))


def lamb_scale(p, update, trust, c):
    "Second pass over a pack: p ← decay·p − lr·q·update, with q its param's trust ratio, given per element."
    p.mul_(c[ADAM.decay]).sub_(c[ADAM.lr] * trust * update)


def _step_pack(pack, c, l2, norms, rounding=None):
    # L2, when there is any, is added in the first pass, which reads the params anyway. The update goes to a
    # buffer of the step's: the gradients are the params' own (see `fused.Pack`).
    update, comps = pack.scratch(), [pack.flat_comp] if pack.flat_comp is not None else []
    run_flat(lamb_direction, [pack.flat_p, pack.flat_g, *pack.flat_states, update, *comps], c, rounding, writes=False)
    p_norm, u_norm = pack.norms(pack.flat_p, update, whole=norms)
    trust = trust_ratio(c[ADAM.decay].abs() * p_norm, u_norm)  # rms(p) / rms(u) = ‖p‖ / ‖u‖
    run_flat(lamb_scale, [pack.flat_p, update, pack.spread(trust), *comps], c, rounding, writes=True)


# Two compiled passes: the update's norm must be complete before any param moves.
fused_lamb_step = CompiledStep(lamb_step, lamb_norms, adam_coefficients, ADAM, then=lamb_apply,
                               pack_step=PackStep(_step_pack, ((lamb_direction, 0, False), (lamb_scale, 1, True))))


class LambForEachOptimizer(ForEachOptimizer):
    "fastai's `Lamb` as one foreach step; `fused=True`: the compiled update."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_lamb_step if fused else lamb_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native.Lamb, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
