"Adam, AdamW (decoupled weight decay) and the pieces the Adam family shares."
import fastai.optimizer as native
import torch

from ..ops import add_scalar_, device_tensor, mul_scalar_
from ..accumulation import Accumulation, Average
from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import Coefficients, CompiledStep, EitherStep, KernelStep
from ..rules import declare

__all__ = ['AdamForEachOptimizer', 'adam_step', 'adam_update', 'adam_direction', 'average_grads', 'debiased_rms', 'fused_adam_step',
           'average_grads_update', 'averaging_coefficients', 'adam_coefficients', 'AVERAGING', 'ADAM']


def average_grads(g, grad_avg, sqr_avg, *, mom, sqr_mom):
    "grad_avg ← mom·grad_avg + (1 − mom)·g;  sqr_avg ← sqr_mom·sqr_avg + (1 − sqr_mom)·g²"
    torch._foreach_lerp_(grad_avg, g, 1 - mom)
    mul_scalar_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, g, g, 1 - sqr_mom)


# What every Adam-style update starts from (`averaging_coefficients`); the family's layouts extend it.
AVERAGING = Coefficients('mom', 'damp', 'sqr_mom', 'sqr_damp', 'inv_debias1', 'inv_debias2')
ADAM = AVERAGING.extend('lr', 'eps')


def average_grads_update(g, grad_avg, sqr_avg, c):
    "One tensor of `average_grads`, from the `AVERAGING` places of `c`."
    grad_avg.mul_(c[AVERAGING.mom]).add_(c[AVERAGING.damp] * g)
    sqr_avg.mul_(c[AVERAGING.sqr_mom]).add_(c[AVERAGING.sqr_damp] * g * g)


def averaging_coefficients(mom: float, sqr_mom: float, step: int) -> dict:
    """mom, damp = 1 − mom, sqr_mom, sqr_damp = 1 − sqr_mom, 1 / debias1, 1 / debias2 (`AVERAGING`).
    Reciprocals, computed in float64, so that the compiled loop multiplies instead of dividing."""
    return dict(mom=mom, damp=1 - mom, sqr_mom=sqr_mom, sqr_damp=1 - sqr_mom, inv_debias1=1 / debias(mom, 1 - mom, step),
                inv_debias2=1 / debias(sqr_mom, 1 - sqr_mom, step))


def debiased_rms(sqr_avg, *, step, sqr_mom, eps):
    "A new list: √(sqr_avg / debias2) + eps."
    denom = torch._foreach_div(sqr_avg, debias(sqr_mom, 1 - sqr_mom, step))
    torch._foreach_sqrt_(denom)
    if eps: add_scalar_(denom, eps)
    return denom


def adam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps):
    "p ← p − lr · (grad_avg / debias1) / (√(sqr_avg / debias2) + eps), after `average_grads`"
    average_grads(g, grad_avg, sqr_avg, mom=mom, sqr_mom=sqr_mom)
    adam_move(p, grad_avg, sqr_avg, step=step, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps)


def adam_move(p, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps):
    "`adam_step`'s move of the params, from its averages."
    denom = debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps)
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr / debias(mom, 1 - mom, step))


# The averages of the Adam family, as optimizer accumulation folds micro-batches into them.
ADAM_AVERAGES = (Average('grad_avg', 'mom'), Average('sqr_avg', 'sqr_mom', power=2))
declare(accumulation=Accumulation(ADAM_AVERAGES, adam_move))(adam_step)


_STEP_TENSORS: dict = {}  # device -> (step, the step count there): one copy per step, not one per kernel call


def _step_tensor(step: int, device: torch.device) -> torch.Tensor:
    "The step count as a float32 tensor on `device`, made once per step (the kernels only read it)."
    held = _STEP_TENSORS.get(device)
    if held is None or held[0] != step:
        held = _STEP_TENSORS[device] = (step, device_tensor(float(step), torch.float32, device))
    return held[1]


def _torch_fused_adam(p, g, states, hypers, *, wd, decouple_wd):
    "PyTorch's fused AdamW (decoupled) or Adam (L2) kernel: fastai's update, √(v/debias2) taken as √v/√debias2."
    step = _step_tensor(hypers['step'], p[0].device)
    kernel = torch._fused_adamw_ if decouple_wd else torch._fused_adam_
    kernel(p, g, *states, [], [step] * len(p), lr=hypers['lr'], beta1=hypers['mom'], beta2=hypers['sqr_mom'],
           weight_decay=wd, eps=hypers['eps'], amsgrad=False, maximize=False)


def adam_update(p, g, grad_avg, sqr_avg, c):
    """One tensor of `adam_step` (compiled: for 16-bit params stepped in float32, which PyTorch's kernels do not
    do), laid out as `ADAM`."""
    average_grads_update(g, grad_avg, sqr_avg, c)
    p.sub_(c[ADAM.lr] * (grad_avg * c[ADAM.inv_debias1]) / ((sqr_avg * c[ADAM.inv_debias2]).sqrt() + c[ADAM.eps]))


def adam_direction(grad_avg, sqr_avg, c):
    """Adam's debiased direction, (grad_avg / debias1) / (√(sqr_avg / debias2) + eps), from a `c` laid out as
    `ADAM` or a layout that extends it (LAMB's, StableAdam's)."""
    return (grad_avg * c[ADAM.inv_debias1]) / ((sqr_avg * c[ADAM.inv_debias2]).sqrt() + c[ADAM.eps])


def adam_coefficients(*, step, lr, mom, sqr_mom, eps): return {**averaging_coefficients(mom, sqr_mom, step), 'lr': lr, 'eps': eps}


fused_adam_step = EitherStep(KernelStep(adam_step, _torch_fused_adam, decoupled_in_kernel=True),
                             CompiledStep(adam_step, adam_update, adam_coefficients, ADAM))


class AdamForEachOptimizer(ForEachOptimizer):
    """fastai's `Adam` as one foreach step: AdamW with `decouple_wd=True`, Adam with L2 otherwise.
    `fused=True`: PyTorch's fused AdamW/Adam kernel."""
    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_adam_step if fused else adam_step, decouple_wd=decouple_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, fastai=native.Adam, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
