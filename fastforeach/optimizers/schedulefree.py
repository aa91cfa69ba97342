"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"): no lr schedule after warm-up; the
params a model trains at (y) interpolate between a running average of iterates (x, where it is evaluated)
and the base sequence z, which takes the Adam-normalised steps.

    y = (1 − beta1)·z + beta1·x;   z ← z − lr_t·u;   x ← (1 − c)·x + c·z,   c = w_t / Σ w

with u = g / (√(v / debias2) + eps) + wd·y and w_t = t^r · max lr^weight_lr_power. Only y and z are stored
(the params hold y while training, x while evaluating: `train()` and `eval()` switch, which the
`ScheduleFree` callback does around validation).
"""
import torch
from fastai.optimizer import Optimizer, l2_reg, step_stat

from ..fastai import ForEachOptimizer
from ..ops import debias
from ..fused import Coefficients, CompiledStep
from ..ops import mul_scalar_
from ..precision import COMP
from ..rules import AT_LEAST_ZERO, FRACTION, Scalars, StateSpec, declare
from .adam import debiased_rms

__all__ = ['ScheduleFreeAdamForEachOptimizer', 'schedule_free_adam_step', 'fused_schedule_free_adam_step',
           'native_schedule_free_adam', 'ScheduleFreeModes']


def advance_schedule(*, step, lr, warmup_steps, r, weight_lr_power, weight_sum, lr_max, **_) -> dict:
    "This step's running scalars from the last: the largest warmed-up lr so far, and the sum of the weights w_t."
    lr_max = max(_warmed_up(lr, step, warmup_steps), lr_max)
    return {'lr_max': lr_max, 'weight_sum': weight_sum + step ** r * lr_max ** weight_lr_power}


def _warmed_up(lr, step, warmup_steps): return lr * min(1., step / warmup_steps) if warmup_steps else lr


def schedule(*, step, lr, warmup_steps, r, weight_lr_power, weight_sum, lr_max) -> tuple[float, float]:
    "(lr_t, c): the warmed-up lr, and the weight c = w_t / Σ w with which x moves to z (running scalars advanced)."
    weight = step ** r * lr_max ** weight_lr_power
    return _warmed_up(lr, step, warmup_steps), weight / weight_sum if weight_sum else 0.


def schedule_free_adam_step(p, g, z, sqr_avg, *, step, lr, beta1, sqr_mom, eps, warmup_steps, r, weight_lr_power,
                            weight_sum, lr_max, decay=None):
    """z ← p on the first step;  sqr_avg as Adam's;  u = g / (√(sqr_avg / debias2) + eps) + wd·p;
    p ← p + c·(z − p) + lr_t·(beta1·(1 − c) − 1)·u;  z ← z − lr_t·u  (p holds y; see the module docstring)."""
    lr_t, c = schedule(step=step, lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                       weight_sum=weight_sum, lr_max=lr_max)
    if step == 1: torch._foreach_copy_(z, p)
    mul_scalar_(sqr_avg, sqr_mom)
    torch._foreach_addcmul_(sqr_avg, g, g, 1 - sqr_mom)
    u = torch._foreach_div(g, debiased_rms(sqr_avg, step=step, sqr_mom=sqr_mom, eps=eps))
    if decay is not None and any(decay):
        idx = [i for i, wd in enumerate(decay) if wd]
        torch._foreach_add_([u[i] for i in idx], torch._foreach_mul([p[i] for i in idx], [decay[i] for i in idx]))
    torch._foreach_lerp_(p, z, c)
    torch._foreach_add_(p, u, alpha=lr_t * (beta1 * (1 - c) - 1))
    torch._foreach_add_(z, u, alpha=-lr_t)


# z is a weight, where 16-bit rounding would lose small steps as a 16-bit param does: float32 for 16-bit params.
declare(state={'z': StateSpec(weight=True)},
        hypers={'beta1': FRACTION, 'warmup_steps': AT_LEAST_ZERO, 'r': AT_LEAST_ZERO, 'weight_lr_power': AT_LEAST_ZERO},
        scalars=Scalars({'weight_sum': 0., 'lr_max': -1.}, advance_schedule),
        accumulation="Schedule-free steps move the params by the normalised gradient itself, which optimizer "
                     "accumulation does not keep")(schedule_free_adam_step)


# lr_t and mix (c): see `schedule`; sqr_damp: 1 − sqr_mom; after_first: 0 on the first step and 1 after.
SCHEDULE_FREE = Coefficients('lr_t', 'mix', 'beta1', 'sqr_mom', 'sqr_damp', 'inv_debias2', 'eps', 'after_first')


def schedule_free_adam_update(p, g, z, sqr_avg, c):
    "One tensor of `schedule_free_adam_step`, doing its own weight decay (`decay` is the decoupled wd)."
    S = SCHEDULE_FREE
    wd, g = c[S.decay], g + c[S.l2] * p
    z.copy_(z * c[S.after_first] + p * (1 - c[S.after_first]))
    sqr_avg.mul_(c[S.sqr_mom]).add_(c[S.sqr_damp] * g * g)
    u = g / ((sqr_avg * c[S.inv_debias2]).sqrt() + c[S.eps]) + wd * p
    p.add_(c[S.mix] * (z - p) + c[S.lr_t] * (c[S.beta1] * (1 - c[S.mix]) - 1) * u)
    z.sub_(c[S.lr_t] * u)


def _coefficients(*, step, lr, beta1, sqr_mom, eps, warmup_steps, r, weight_lr_power, weight_sum, lr_max):
    lr_t, c = schedule(step=step, lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                       weight_sum=weight_sum, lr_max=lr_max)
    return dict(lr_t=lr_t, mix=c, beta1=beta1, sqr_mom=sqr_mom, sqr_damp=1 - sqr_mom,
                inv_debias2=1 / debias(sqr_mom, 1 - sqr_mom, step), eps=eps, after_first=float(step > 1))


fused_schedule_free_adam_step = CompiledStep(schedule_free_adam_step, schedule_free_adam_update, _coefficients,
                                             SCHEDULE_FREE, own_decay=True)


def schedule_free_adam_stepper(p, lr, beta1, sqr_mom, eps, warmup_steps, r, weight_lr_power, step, z=None,
                               sqr_avg=None, weight_sum=0., lr_max=-1., wd=0., do_wd=True, decouple_wd=True, **kwargs):
    "fastai-style stepper, one param: `schedule_free_adam_step`'s update (the per-param reference of the tests)."
    hypers = dict(step=step, lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
    scalars = advance_schedule(**hypers, weight_sum=weight_sum, lr_max=lr_max)
    lr_t, c = schedule(**hypers, **scalars)
    g = p.grad.data
    if z is None: z, sqr_avg = p.data.clone(), torch.zeros_like(p, memory_format=torch.preserve_format)
    sqr_avg.mul_(sqr_mom).addcmul_(g, g, value=1 - sqr_mom)
    u = g / ((sqr_avg / (1 - sqr_mom ** step)).sqrt() + eps)
    if decouple_wd and do_wd and wd: u = u + wd * p.data
    p.data.lerp_(z, c).add_(u, alpha=lr_t * (beta1 * (1 - c) - 1))
    z.sub_(u, alpha=lr_t)
    return {'z': z, 'sqr_avg': sqr_avg, **scalars}


class ScheduleFreeModes:
    """`train()` and `eval()` for schedule-free optimizers: the params hold y while training and x while
    evaluating (x = y + (1 − 1/beta1)·(z − y), y = x + (1 − beta1)·(z − x)). The mode is kept per param group,
    in its hypers (`train_mode`), so that it is saved and loaded with the state dict. A new optimizer is in
    train mode: x = y = z before the first step."""
    def train(self): self._switch(True)
    def eval(self): self._switch(False)

    def _mode_groups(self) -> list:
        "Each param group as (its params, the dict that keeps its `train_mode`, its beta1)."
        return [(params, hyper, hyper['beta1']) for params, hyper in zip(self.param_lists, self.hypers)]

    @torch.no_grad()
    def _switch(self, train: bool):
        for params, hyper, beta1 in self._mode_groups():
            if hyper.get('train_mode', True) == train: continue
            weight = 1 - beta1 if train else 1 - 1 / beta1
            pairs = [(p, self.state[p]['z']) for p in params if 'z' in self.state[p]]
            plain = [(p, z) for p, z in pairs if p.dtype == z.dtype]
            if plain: torch._foreach_lerp_(*map(list, zip(*plain)), weight)
            for p, z in pairs:
                if p.dtype != z.dtype: self._switch_in_float32(p, z, weight)
            hyper['train_mode'] = train

    def _switch_in_float32(self, p, z, weight):
        "A 16-bit param whose z is float32: moved on its float32 working value, written back as its steps are."
        comp = self.state[p].get(COMP)
        comps = [comp] if comp is not None and self.rounding.kahan else None
        self.rounding.update_in_float32([p], comps, lambda w: torch._foreach_lerp_(w, [z], weight))

    def _start_in_train_mode(self):
        for _, hyper, _ in self._mode_groups(): hyper.setdefault('train_mode', True)

    def check_train_mode(self):
        if not all(hyper.get('train_mode', True) for _, hyper, _ in self._mode_groups()):
            raise ValueError(f"{type(self).__name__} is in eval mode (its params hold the averaged weights x): "
                             "call opt.train() before a step, or train with the ScheduleFree callback")


class _NativeScheduleFreeAdam(ScheduleFreeModes, Optimizer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._start_in_train_mode()

    def step(self, closure=None):
        self.check_train_mode()
        return super().step(closure)


def native_schedule_free_adam(params, lr, beta1=0.9, sqr_mom=0.999, eps=1e-8, wd=0., decouple_wd=True, warmup_steps=0,
                              r=0., weight_lr_power=2.):
    "ScheduleFreeAdam as fastai would write it: a fastai `Optimizer` of per-param steppers, with train/eval modes."
    from functools import partial
    cbs = ([] if decouple_wd else [l2_reg]) + [step_stat, partial(schedule_free_adam_stepper, decouple_wd=decouple_wd)]
    return _NativeScheduleFreeAdam(params, cbs, lr=lr, beta1=beta1, sqr_mom=sqr_mom, eps=eps, wd=wd,
                                   warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)


class ScheduleFreeAdamForEachOptimizer(ScheduleFreeModes, ForEachOptimizer):
    """Schedule-Free AdamW as one foreach step; `fused=True`: the compiled update. The defaults of the
    `schedulefree` package's AdamWScheduleFree (its betas as `beta1`, `sqr_mom`). `beta1` is not called `mom`
    so that fastai's `fit_one_cycle` leaves it alone: x and y are related through a fixed beta1.
    `warmup_steps`: a linear warm-up of the lr over that many steps (or warm up with fastai's schedules)."""
    def __init__(self, params, lr, beta1=0.9, sqr_mom=0.999, eps=1e-8, wd=0., decouple_wd=True, warmup_steps=0,
                 r=0., weight_lr_power=2., *, fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, fused_schedule_free_adam_step if fused else schedule_free_adam_step,
                         decouple_wd=decouple_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format,
                         fastai=native_schedule_free_adam, lr=lr, beta1=beta1, sqr_mom=sqr_mom, eps=eps, wd=wd,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
        self._start_in_train_mode()

    def check_hypers(self):
        "As `ForEachOptimizer`'s, and in train mode: before every step (gradient release's buckets too)."
        super().check_hypers()
        self.check_train_mode()
