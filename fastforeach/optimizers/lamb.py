"LAMB: Adam with a per-layer trust ratio."
import torch

from ..engine import ForEachOptimizer, debias
from .adam import average_grads, debiased_rms

__all__ = ['LambForEachOptimizer', 'lamb_step']


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


class LambForEachOptimizer(ForEachOptimizer):
    "fastai's `Lamb` as one foreach step."
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., decouple_wd=True):
        super().__init__(params, lamb_step, decouple_wd=decouple_wd,
                         lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
