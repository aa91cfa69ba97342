"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
momentum as the update, one state tensor."""
import torch
from fastai.optimizer import Optimizer, l2_reg, weight_decay

from ..fastai import ForEachOptimizer
from ..fused import Coefficients, CompiledStep
from ..rules import FRACTION, declare

__all__ = ['LionForEachOptimizer', 'lion_step', 'fused_lion_step', 'lion_stepper', 'native_lion']


def lion_step(p, g, grad_avg, *, lr, beta1, beta2):
    "p ← p − lr·sign(beta1·grad_avg + (1 − beta1)·g);  grad_avg ← beta2·grad_avg + (1 − beta2)·g"
    update = torch._foreach_lerp(grad_avg, g, 1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(p, update, alpha=-lr)
    torch._foreach_lerp_(grad_avg, g, 1 - beta2)


declare(hypers={'beta1': FRACTION, 'beta2': FRACTION},
        accumulation="Lion's update is the sign of a mix of its average and the gradient itself, which optimizer "
                     "accumulation does not keep")(lion_step)


LION = Coefficients('lr', 'damp1', 'damp2')  # damp: 1 − beta


def lion_update(p, g, grad_avg, c):
    "One tensor of `lion_step`."
    p.sub_(c[LION.lr] * (grad_avg + c[LION.damp1] * (g - grad_avg)).sign())
    grad_avg.add_(c[LION.damp2] * (g - grad_avg))


def _coefficients(*, lr, beta1, beta2): return {'lr': lr, 'damp1': 1 - beta1, 'damp2': 1 - beta2}


fused_lion_step = CompiledStep(lion_step, lion_update, _coefficients, LION)


def lion_stepper(p, lr, beta1, beta2, grad_avg=None, **kwargs):
    "fastai-style stepper, one param: `lion_step`'s update (the per-param reference the tests hold it to)."
    if grad_avg is None: grad_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
    g = p.grad.data
    p.data.add_(torch.lerp(grad_avg, g, 1 - beta1).sign_(), alpha=-lr)
    grad_avg.lerp_(g, 1 - beta2)
    return {'grad_avg': grad_avg}


def native_lion(params, lr, beta1=0.9, beta2=0.99, wd=0.1, decouple_wd=True):
    "Lion as fastai would write it: a fastai `Optimizer` of per-param steppers."
    return Optimizer(params, [weight_decay if decouple_wd else l2_reg, lion_stepper], lr=lr, beta1=beta1, beta2=beta2,
                     wd=wd)


class LionForEachOptimizer(ForEachOptimizer):
    """Lion as one foreach step; `fused=True`: the compiled update. Decoupled weight decay by default, as in
    the paper (which advises an lr 3-10x smaller than AdamW's, and a wd as much larger)."""
    def __init__(self, params, lr, beta1=0.9, beta2=0.99, wd=0.1, decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_lion_step if fused else lion_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native_lion, lr=lr, beta1=beta1, beta2=beta2, wd=wd)
