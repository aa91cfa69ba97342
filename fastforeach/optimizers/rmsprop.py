"RMSProp, with or without momentum."
import fastai.optimizer as native
import torch

from ..ops import mul_scalar_, add_scalar_
from ..accumulation import Accumulation, Average
from ..fastai import ForEachOptimizer
from ..fused import Coefficients, CompiledStep
from ..rules import declare

__all__ = ['RMSPropForEachOptimizer', 'rmsprop_step', 'momentum_rmsprop_step', 'fused_rmsprop_step',
           'fused_momentum_rmsprop_step', 'torch_rmsprop_steps']


def _scaled_by_rms(p, direction, sqr_avg, g, *, lr, sqr_mom, eps):
    mul_scalar_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, g, g, 1 - sqr_mom)
    denom = torch._foreach_sqrt(sqr_avg)
    add_scalar_(denom, eps)
    torch._foreach_addcdiv_(p, direction, denom, -lr)


def rmsprop_step(p, g, sqr_avg, *, lr, sqr_mom, eps):
    "sqr_avg ← sqr_mom·sqr_avg + (1 − sqr_mom)·g²;  p ← p − lr·g / (√sqr_avg + eps)"
    _scaled_by_rms(p, g, sqr_avg, g, lr=lr, sqr_mom=sqr_mom, eps=eps)


def momentum_rmsprop_step(p, g, grad_avg, sqr_avg, *, lr, mom, sqr_mom, eps):
    "grad_avg ← mom·grad_avg + g;  sqr_avg as in `rmsprop_step`;  p ← p − lr·grad_avg / (√sqr_avg + eps)"
    mul_scalar_(grad_avg, mom)
    torch._foreach_add_(grad_avg, g)
    _scaled_by_rms(p, grad_avg, sqr_avg, g, lr=lr, sqr_mom=sqr_mom, eps=eps)


def momentum_rmsprop_move(p, grad_avg, sqr_avg, *, lr, eps, **_):
    "`momentum_rmsprop_step`'s move of the params, from its averages."
    denom = torch._foreach_sqrt(sqr_avg)
    add_scalar_(denom, eps)
    torch._foreach_addcdiv_(p, grad_avg, denom, -lr)


declare(accumulation=Accumulation((Average('grad_avg', 'mom', dampened=False), Average('sqr_avg', 'sqr_mom', power=2)),
                                   momentum_rmsprop_move))(momentum_rmsprop_step)
declare(accumulation="RMSProp without momentum moves the params by the gradient itself, which optimizer "
                     "accumulation does not keep (use momentum)")(rmsprop_step)


# torch.optim.RMSprop's forms: centred (the variance about the average gradient), and momentum over the
# scaled gradient (fastai's averages the gradient itself); without either, `rmsprop_step`'s. Each counts
# its steps (`step`, unused by the update) as torch's state does.

def _rms(sqr_avg, grad_avg, g, *, sqr_mom, eps) -> list:
    """sqr_avg ← sqr_mom·sqr_avg + (1 − sqr_mom)·g², and grad_avg ← sqr_mom·grad_avg + (1 − sqr_mom)·g when
    centred (grad_avg not None); the denominators √(sqr_avg − grad_avg²) + eps, or √sqr_avg + eps."""
    mul_scalar_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, g, g, 1 - sqr_mom)
    if grad_avg is None: denom = torch._foreach_sqrt(sqr_avg)
    else:
        torch._foreach_lerp_(grad_avg, g, 1 - sqr_mom)
        denom = torch._foreach_addcmul(sqr_avg, grad_avg, grad_avg, -1)
        torch._foreach_sqrt_(denom)
    add_scalar_(denom, eps)
    return denom


def _momentum_move(p, g, momentum_buffer, denom, *, lr, mom):
    "momentum_buffer ← mom·momentum_buffer + g / denom;  p ← p − lr·momentum_buffer"
    mul_scalar_(momentum_buffer, mom)
    torch._foreach_addcdiv_(momentum_buffer, g, denom)
    torch._foreach_add_(p, momentum_buffer, alpha=-lr)


def counted_rmsprop_step(p, g, sqr_avg, *, step, lr, sqr_mom, eps):
    "`rmsprop_step`, its steps counted"
    rmsprop_step(p, g, sqr_avg, lr=lr, sqr_mom=sqr_mom, eps=eps)


def centered_rmsprop_step(p, g, grad_avg, sqr_avg, *, step, lr, sqr_mom, eps):
    "Averages as `_rms` says (centred);  p ← p − lr·g / (√(sqr_avg − grad_avg²) + eps)"
    torch._foreach_addcdiv_(p, g, _rms(sqr_avg, grad_avg, g, sqr_mom=sqr_mom, eps=eps), -lr)


def scaled_momentum_rmsprop_step(p, g, sqr_avg, momentum_buffer, *, step, lr, mom, sqr_mom, eps):
    "sqr_avg as in `rmsprop_step`;  momentum_buffer ← mom·momentum_buffer + g / (√sqr_avg + eps);  p ← p − lr·momentum_buffer"
    _momentum_move(p, g, momentum_buffer, _rms(sqr_avg, None, g, sqr_mom=sqr_mom, eps=eps), lr=lr, mom=mom)


def centered_scaled_momentum_rmsprop_step(p, g, grad_avg, sqr_avg, momentum_buffer, *, step, lr, mom, sqr_mom, eps):
    "`scaled_momentum_rmsprop_step` with the centred denominator √(sqr_avg − grad_avg²) + eps"
    _momentum_move(p, g, momentum_buffer, _rms(sqr_avg, grad_avg, g, sqr_mom=sqr_mom, eps=eps), lr=lr, mom=mom)


declare(accumulation="RMSProp without momentum moves the params by the gradient itself, which optimizer "
                     "accumulation does not keep")(counted_rmsprop_step)
for _rule in (centered_rmsprop_step, scaled_momentum_rmsprop_step, centered_scaled_momentum_rmsprop_step):
    declare(accumulation="torch's RMSprop divides each gradient by the running RMS before it is averaged, "
                         "which optimizer accumulation cannot fold")(_rule)


RMSPROP = Coefficients('lr', 'sqr_mom', 'sqr_damp', 'eps', 'mom')  # sqr_damp: 1 − sqr_mom


def _scaled_by_rms_update(p, direction, sqr_avg, g, c):
    sqr_avg.mul_(c[RMSPROP.sqr_mom]).add_(c[RMSPROP.sqr_damp] * g * g)
    p.sub_(c[RMSPROP.lr] * direction / (sqr_avg.sqrt() + c[RMSPROP.eps]))


def rmsprop_update(p, g, sqr_avg, c):
    "One tensor of `rmsprop_step`."
    _scaled_by_rms_update(p, g, sqr_avg, g, c)


def momentum_rmsprop_update(p, g, grad_avg, sqr_avg, c):
    "One tensor of `momentum_rmsprop_step`."
    grad_avg.mul_(c[RMSPROP.mom]).add_(g)
    _scaled_by_rms_update(p, grad_avg, sqr_avg, g, c)


def _rms_update(sqr_avg, grad_avg, g, c):
    "One tensor of `_rms`: the denominator."
    sqr_avg.mul_(c[RMSPROP.sqr_mom]).add_(c[RMSPROP.sqr_damp] * g * g)
    if grad_avg is None: return sqr_avg.sqrt() + c[RMSPROP.eps]
    grad_avg.lerp_(g, c[RMSPROP.sqr_damp])
    return (sqr_avg - grad_avg * grad_avg).sqrt() + c[RMSPROP.eps]


def centered_rmsprop_update(p, g, grad_avg, sqr_avg, c):
    "One tensor of `centered_rmsprop_step`."
    p.sub_(c[RMSPROP.lr] * g / _rms_update(sqr_avg, grad_avg, g, c))


def scaled_momentum_rmsprop_update(p, g, sqr_avg, momentum_buffer, c):
    "One tensor of `scaled_momentum_rmsprop_step`."
    momentum_buffer.mul_(c[RMSPROP.mom]).add_(g / _rms_update(sqr_avg, None, g, c))
    p.sub_(c[RMSPROP.lr] * momentum_buffer)


def centered_scaled_momentum_rmsprop_update(p, g, grad_avg, sqr_avg, momentum_buffer, c):
    "One tensor of `centered_scaled_momentum_rmsprop_step`."
    momentum_buffer.mul_(c[RMSPROP.mom]).add_(g / _rms_update(sqr_avg, grad_avg, g, c))
    p.sub_(c[RMSPROP.lr] * momentum_buffer)


def _coefficients(*, lr, sqr_mom, eps, mom=0., step=None): return dict(lr=lr, sqr_mom=sqr_mom, sqr_damp=1 - sqr_mom, eps=eps, mom=mom)


fused_rmsprop_step = CompiledStep(rmsprop_step, rmsprop_update, _coefficients, RMSPROP)
fused_momentum_rmsprop_step = CompiledStep(momentum_rmsprop_step, momentum_rmsprop_update, _coefficients, RMSPROP)

# torch.optim.RMSprop's steps by (centered, with momentum): each rule and its fused form.
torch_rmsprop_steps = {
    (False, False): (counted_rmsprop_step, CompiledStep(counted_rmsprop_step, rmsprop_update, _coefficients, RMSPROP)),
    (True, False): (centered_rmsprop_step, CompiledStep(centered_rmsprop_step, centered_rmsprop_update, _coefficients, RMSPROP)),
    (False, True): (scaled_momentum_rmsprop_step, CompiledStep(scaled_momentum_rmsprop_step, scaled_momentum_rmsprop_update,
                                                               _coefficients, RMSPROP)),
    (True, True): (centered_scaled_momentum_rmsprop_step, CompiledStep(
        centered_scaled_momentum_rmsprop_step, centered_scaled_momentum_rmsprop_update, _coefficients, RMSPROP)),
}


class RMSPropForEachOptimizer(ForEachOptimizer):
    """fastai's `RMSProp` as one foreach step.

    fastai's own `RMSProp` drops its `eps` argument and always uses 1e-8; this one uses the `eps` given
    (the same result at the default). `fused=True`: the compiled per-tensor update."""
    def __init__(self, params, lr, mom=0., sqr_mom=0.99, eps=1e-8, wd=0., decouple_wd=True, *, fused=False,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        if mom == 0: rule = fused_rmsprop_step if fused else rmsprop_step
        else: rule = fused_momentum_rmsprop_step if fused else momentum_rmsprop_step
        super().__init__(params, rule, decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format,
                         fastai=native.RMSProp, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
