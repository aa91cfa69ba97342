"SGD, with or without momentum."
import fastai.optimizer as native
import torch

from ..ops import mul_scalar_
from ..accumulation import Accumulation, Average
from ..fastai import ForEachOptimizer
from ..fused import Coefficients, CompiledStep, EitherStep, KernelStep
from ..rules import declare

__all__ = ['SGDForEachOptimizer', 'sgd_step', 'momentum_sgd_step', 'fused_sgd_step', 'fused_momentum_sgd_step',
           'torch_sgd_step', 'fused_torch_sgd_step']


def sgd_step(p, g, *, lr):
    "p ← p − lr·g"
    torch._foreach_add_(p, g, alpha=-lr)


def momentum_sgd_step(p, g, grad_avg, *, lr, mom):
    "grad_avg ← mom·grad_avg + g;  p ← p − lr·grad_avg"
    mul_scalar_(grad_avg, mom)
    torch._foreach_add_(grad_avg, g)
    momentum_sgd_move(p, grad_avg, lr=lr)


def momentum_sgd_move(p, grad_avg, *, lr, **_):
    "`momentum_sgd_step`'s move of the params, from its momentum."
    torch._foreach_add_(p, grad_avg, alpha=-lr)


declare(accumulation=Accumulation((Average('grad_avg', 'mom', dampened=False),), momentum_sgd_move))(momentum_sgd_step)
declare(accumulation="plain SGD keeps no average to fold gradients into (use momentum, or fastai's "
                     "GradientAccumulation)")(sgd_step)


def torch_sgd_step(p, g, grad_avg, *, step, lr, mom, dampening=0., nesterov=False):
    """torch.optim.SGD's momentum: grad_avg ← g on the first step, then mom·grad_avg + (1 − dampening)·g;
    p ← p − lr·(g + mom·grad_avg) with nesterov, else p − lr·grad_avg. With dampening 0 and without nesterov,
    `momentum_sgd_step` exactly."""
    if step == 1: torch._foreach_copy_(grad_avg, g)
    else:
        mul_scalar_(grad_avg, mom)
        torch._foreach_add_(grad_avg, g, alpha=1 - dampening)
    torch._foreach_add_(p, torch._foreach_add(g, grad_avg, alpha=mom) if nesterov else grad_avg, alpha=-lr)


declare(accumulation="torch.optim.SGD's momentum starts from the first gradient, which optimizer accumulation "
                     "would fold into a zero buffer")(torch_sgd_step)


def _torch_fused_sgd(p, g, states, hypers, *, wd, decouple_wd):
    "PyTorch's fused SGD: with dampening 0 and buffers that start at zero, fastai's update exactly."
    torch._fused_sgd_(p, g, states[0] if states else [], weight_decay=0. if decouple_wd else wd,
                      momentum=hypers.get('mom', 0.), lr=hypers['lr'], dampening=0., nesterov=False, maximize=False,
                      is_first_step=False)


def _torch_sgd_kernel(p, g, states, hypers, *, wd, decouple_wd):
    "PyTorch's fused SGD with its own dampening, nesterov and first step: torch.optim.SGD's update."
    torch._fused_sgd_(p, g, states[0], weight_decay=0. if decouple_wd else wd, momentum=hypers['mom'], lr=hypers['lr'],
                      dampening=hypers.get('dampening', 0.), nesterov=hypers.get('nesterov', False), maximize=False,
                      is_first_step=hypers['step'] == 1)


fused_torch_sgd_step = KernelStep(torch_sgd_step, _torch_sgd_kernel)


SGD = Coefficients('lr', 'mom')


def sgd_update(p, g, c):
    "One tensor of `sgd_step`."
    p.sub_(c[SGD.lr] * g)


def momentum_sgd_update(p, g, grad_avg, c):
    "One tensor of `momentum_sgd_step`."
    grad_avg.mul_(c[SGD.mom]).add_(g)
    p.sub_(c[SGD.lr] * grad_avg)


def _coefficients(*, lr, mom=0.): return {'lr': lr, 'mom': mom}


def _has_momentum(p, hypers): return hypers['mom'] != 0


# PyTorch's kernel has L2 but not decoupled weight decay: with decoupled decay to do, the compiled update
# does it in the same pass. The kernel leaves the buffer alone at momentum 0, where fastai's sets it to
# the gradient: then the compiled update steps.
fused_sgd_step = EitherStep(KernelStep(sgd_step, _torch_fused_sgd), CompiledStep(sgd_step, sgd_update, _coefficients, SGD))
fused_momentum_sgd_step = EitherStep(
    KernelStep(momentum_sgd_step, _torch_fused_sgd, ready=_has_momentum),
    CompiledStep(momentum_sgd_step, momentum_sgd_update, _coefficients, SGD))


class SGDForEachOptimizer(ForEachOptimizer):
    """fastai's `SGD` as one foreach step; `mom` at construction picks plain or momentum SGD, as in fastai.
    `fused=True`: PyTorch's fused SGD kernel, or a compiled update when there is decoupled weight decay."""
    def __init__(self, params, lr, mom=0., wd=0., decouple_wd=True, *, fused=False, rounding='kahan',
                 kahan_dtype=torch.float32, state_format=None):
        if mom == 0: rule = fused_sgd_step if fused else sgd_step
        else: rule = fused_momentum_sgd_step if fused else momentum_sgd_step
        super().__init__(params, rule, decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format,
                         fastai=native.SGD, lr=lr, mom=mom, wd=wd)
