"LAMB: Adam with a per-layer trust ratio."
import torch

from ..engine import ForEachOptimizer, debias
from ..fused import CompiledStep
from .adam import average_grads, average_grads_update, averaging_coefficients, debiased_rms

__all__ = ['LambForEachOptimizer', 'lamb_step', 'fused_lamb_step']


def _rms(tensors):
    "Root mean square of every tensor, as one 1-d tensor."
    norms = torch.stack(torch._foreach_norm(tensors))
    return norms / torch.tensor([t.numel() for t in tensors], dtype=norms.dtype, device=norms.device).sqrt()


def lamb_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps):
    """u = (grad_avg / debias1) / (√(sqr_avg / debias2) + eps);  q = min(rms(p) / rms(u), 10), or 1 when
    either is 0;  p ← p − lr·q·u"""
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    update = torch._foreach_div(grad_avg, debias(mom, 1 - mom, step))
    torch._foreach_div_(update, debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps))
    r1, r2 = _rms(p), _rms(update)
    trust = torch.where((r1 == 0) | (r2 == 0), torch.ones_like(r1), (r1 / r2).clamp_max(10))
    torch._foreach_addcmul_(p, update, (-lr * trust).unbind())


def _adam_direction(grad_avg, sqr_avg, c):
    return (grad_avg * c[6]) / ((sqr_avg * c[7]).sqrt() + c[9])


def lamb_norms(p, g, grad_avg, sqr_avg, c):
    """First pass of one tensor of `lamb_step`: L2 into the gradient, the averages, then rms of the decayed
    param (|decay|·rms(p), p itself is decayed in the second pass) and of the update.
    c = (decay, l2, averaging coefficients, lr, eps)."""
    g = g + c[1] * p
    average_grads_update(g, grad_avg, sqr_avg, c[2:])
    # One 1-d tensor, not two 0-d ones: dynamo would read 0-d inputs of the next pass as Python floats and
    # recompile whenever one turns NaN.
    return (torch.stack((c[0].abs() * p.pow(2).mean().sqrt(), _adam_direction(grad_avg, sqr_avg, c).pow(2).mean().sqrt())),)


def lamb_apply(p, grad_avg, sqr_avg, norms, c):
    "Second pass: p ← decay·p − lr·q·update, with the trust ratio q from the first pass's norms."
    r1, r2 = norms[0], norms[1]
    trust = torch.where((r1 == 0) | (r2 == 0), torch.ones_like(r1), (r1 / r2).clamp_max(10))
    p.mul_(c[0]).sub_(c[8] * trust * _adam_direction(grad_avg, sqr_avg, c))


def _coefficients(*, step, lr, mom, sqr_mom, eps):
    return [*averaging_coefficients(mom, sqr_mom, step), lr, eps]


# Two compiled passes: the update's norm must be complete before any param moves.
fused_lamb_step = CompiledStep(lamb_step, lamb_norms, _coefficients, then=lamb_apply)


class LambForEachOptimizer(ForEachOptimizer):
    "fastai's `Lamb` as one foreach step; `fused=True`: the compiled update."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., decouple_wd=True, *, fused=False):
        super().__init__(params, fused_lamb_step if fused else lamb_step, decouple_wd=decouple_wd,
                         lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
