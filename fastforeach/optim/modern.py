"""Optimizers torch.optim does not ship, on the torch face: torch-style names (`betas`, `weight_decay`), the
defaults of the implementation torch users know them from (torch-optimi for Lion, Adan and StableAdamW;
qhoptim's names for QHAdam), the math of fastforeach's fastai face (the same rules)."""
from __future__ import annotations

import torch

from ..optimizers.adan import adan_step, fused_adan_step
from functools import partial

from ..optimizers.lamb import fused_lamb_step, lamb_step
from ..optimizers.larc import fused_larc_step, larc_step, momentum_larc_step
from ..optimizers.lion import fused_lion_step, lion_step
from ..optimizers.qhadam import fused_qhadam_step, qhadam_step
from ..optimizers.schedulefree import ScheduleFreeModes, fused_schedule_free_adam_step, schedule_free_adam_step
from ..optimizers.stableadam import fused_stable_adam_step, stable_adam_step
from ..rules import AT_LEAST_ZERO
from .base import TorchForEachOptimizer

__all__ = ['Lion', 'Adan', 'StableAdamW', 'Lamb', 'QHAdam', 'Larc', 'LARS', 'ScheduleFreeAdamW', 'FASTAI_EQUIVALENTS', 'REFERENCE_EQUIVALENTS']

ADAM_STATE = {'grad_avg': 'exp_avg', 'sqr_avg': 'exp_avg_sq'}


class _Decoupled(TorchForEachOptimizer):
    "An optimizer whose weight decay is decoupled unless `decoupled_weight_decay=False` makes it L2."
    decouple_wd = True


class Lion(_Decoupled):
    """Lion (Chen et al. 2023), torch-optimi's names and defaults: u = sign(β1·m + (1 − β1)·g);
    m ← β2·m + (1 − β2)·g;  p ← p − lr·u. State `exp_avg` (m), as torch-optimi's."""
    names = {'lr': 'lr', 'betas': ('beta1', 'beta2'), 'weight_decay': 'wd'}
    rules = (lion_step, fused_lion_step)
    state_names = {'grad_avg': 'exp_avg'}

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0., *, decoupled_weight_decay=True,
                 foreach=None, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         decoupled_weight_decay=decoupled_weight_decay,
                         foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)


class Adan(_Decoupled):
    """Adan (Xie et al. 2022), torch-optimi's names and defaults; decoupled weight decay is the paper's
    p ← p / (1 + lr·weight_decay) after the step. Its averages are kept undebiased (torch-optimi keeps them
    debiased: the same update, state not interchangeable)."""
    names = {'lr': 'lr', 'betas': ('beta1', 'beta2', 'beta3'), 'eps': 'eps', 'weight_decay': 'wd'}
    rules = (adan_step, fused_adan_step)
    state_names = {'grad_avg': 'exp_avg', 'diff_avg': 'exp_avg_diff', 'sqr_avg': 'exp_avg_sq'}

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), weight_decay=2e-2, eps=1e-6, *,
                 decoupled_weight_decay=True, foreach=None, fused=None, no_wd=None, rounding='kahan',
                 kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps),
                         decoupled_weight_decay=decoupled_weight_decay,
                         foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)


class StableAdamW(_Decoupled):
    """StableAdamW (Wortsman et al. 2023), torch-optimi's names and defaults: AdamW whose step size is
    divided, per tensor, by max(1, RMS(g²/v̂)). Averages kept undebiased (see `Adan`)."""
    names = {'lr': 'lr', 'betas': ('mom', 'sqr_mom'), 'eps': 'eps', 'weight_decay': 'wd'}
    rules = (stable_adam_step, fused_stable_adam_step)
    state_names = ADAM_STATE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, *, decoupled_weight_decay=True,
                 foreach=None, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps),
                         decoupled_weight_decay=decoupled_weight_decay,
                         foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)


class Lamb(_Decoupled):
    """LAMB (You et al. 2019) as fastai does it, torch-style names with fastai's defaults: Adam's update u,
    then p ← p − lr·min(‖p‖/‖u‖, 10)·u per tensor (1 where either norm is 0)."""
    names = {'lr': 'lr', 'betas': ('mom', 'sqr_mom'), 'eps': 'eps', 'weight_decay': 'wd'}
    rules = (lamb_step, fused_lamb_step)
    state_names = ADAM_STATE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0., *, decoupled_weight_decay=True,
                 foreach=None, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                         decoupled_weight_decay=decoupled_weight_decay,
                         foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)


class QHAdam(_Decoupled):
    """QHAdam (Ma & Yarats 2019) as fastai does it, qhoptim's names (`betas`, `nus`) with fastai's defaults:
    p ← p − lr·((1 − ν1)·g + ν1·m̂) / (√((1 − ν2)·g² + ν2·v̂) + eps)."""
    names = {'lr': 'lr', 'betas': ('mom', 'sqr_mom'), 'nus': ('nu_1', 'nu_2'), 'eps': 'eps', 'weight_decay': 'wd'}
    rules = (qhadam_step, fused_qhadam_step)
    state_names = ADAM_STATE

    def __init__(self, params, lr=1e-3, betas=(0.999, 0.999), nus=(0.7, 1.0), weight_decay=0., eps=1e-8, *,
                 decoupled_weight_decay=True, foreach=None, fused=None, no_wd=None, rounding='kahan',
                 kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, dict(lr=lr, betas=betas, nus=nus, weight_decay=weight_decay, eps=eps),
                         decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused, no_wd=no_wd,
                         rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)



class Larc(_Decoupled):
    """LARC (You et al. 2017, with clipping) as fastai does it, torch-style names with fastai's defaults:
    buf ← momentum·buf + g;  p ← p − local_lr·buf, local_lr = lr·trust_coefficient·‖p‖ / (‖g‖ +
    weight_decay·‖p‖ + eps) per tensor, at most lr (`clip=True`; `LARS` does not clip). `clip` is one
    choice for the optimizer. State `momentum_buffer` and each tensor's last `local_lr`."""
    names = {'lr': 'lr', 'momentum': 'mom', 'trust_coefficient': 'trust_coeff', 'eps': 'eps', 'weight_decay': 'wd'}
    state_names = {'grad_avg': 'momentum_buffer'}
    clip = True

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0., trust_coefficient=0.02, eps=1e-8, *,
                 clip=None, decoupled_weight_decay=True, foreach=None, fused=None, no_wd=None, rounding='kahan',
                 kahan_dtype=torch.float32, state_format=None):
        if clip is not None:
            if not isinstance(clip, bool): raise ValueError(f"Invalid clip: {clip!r} (must be True or False)")
            self.clip = clip
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults, decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused,
                         no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)

    def check_group(self, group, where=''):
        super().check_group(group, where)
        for name in ('trust_coefficient', 'momentum'):
            if name in group: AT_LEAST_ZERO(name, group[name], where)

    def rule(self, groups, fused):
        mom = max(g['momentum'] for g in groups)
        if fused: return fused_larc_step(mom, self.clip)
        return partial(momentum_larc_step if mom else larc_step, clip=self.clip)


class LARS(Larc):
    "`Larc` without clipping the local lr (`clip=False`): LARS (You et al. 2017)."
    clip = False


class ScheduleFreeAdamW(ScheduleFreeModes, _Decoupled):
    """Schedule-Free AdamW (Defazio et al. 2024), the `schedulefree` package's names and defaults: no lr
    schedule after `warmup_steps`; the params hold y while training and x, the average of iterates, after
    `eval()` (call `train()` before stepping again), as the package's `AdamWScheduleFree`. Each group's mode
    is its `train_mode`, saved with the state dict."""
    names = {'lr': 'lr', 'betas': ('beta1', 'sqr_mom'), 'eps': 'eps', 'weight_decay': 'wd',
             'warmup_steps': 'warmup_steps', 'r': 'r', 'weight_lr_power': 'weight_lr_power'}
    rules = (schedule_free_adam_step, fused_schedule_free_adam_step)
    state_names = {'sqr_avg': 'exp_avg_sq'}

    def __init__(self, params, lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0., warmup_steps=0, r=0.,
                 weight_lr_power=2., *, decoupled_weight_decay=True, foreach=None, fused=None, no_wd=None,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=True)
        super().__init__(params, defaults, decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused,
                         no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)

    def _mode_groups(self): return [(g['params'], g, g['betas'][0]) for g in self.param_groups]

    def check_group(self, group, where=''):
        super().check_group(group, where)
        for name in ('warmup_steps', 'r', 'weight_lr_power'):
            if name in group: AT_LEAST_ZERO(name, group[name], where)

    def _step_all(self, only=None):
        "In train mode only (every step, gradient release's buckets too)."
        self.check_train_mode()
        super()._step_all(only)

# Each torch-face class beside the fastai face's optimizer of the same rule (its registry row), with configs
# in torch's keywords; and the published implementations torch users know (torch-optimi, schedulefree).
FASTAI_EQUIVALENTS = {
    'Lion': ('Lion', {'default': {}, 'wd': {'betas': (0.8, 0.95), 'weight_decay': 0.1},
                      'l2': {'weight_decay': 0.01, 'decoupled_weight_decay': False}}),
    'Adan': ('Adan', {'default': {}, 'l2_eps': {'betas': (0.9, 0.8, 0.95), 'eps': 1e-3, 'decoupled_weight_decay': False}}),
    'StableAdamW': ('StableAdam', {'default': {}, 'clipping': {'betas': (0.8, 0.999), 'eps': 1e-8, 'weight_decay': 0.1}}),
    'Lamb': ('Lamb', {'default': {}, 'wd': {'weight_decay': 0.01},
                      'l2': {'weight_decay': 0.01, 'decoupled_weight_decay': False}}),
    'QHAdam': ('QHAdam', {'default': {}, 'nus': {'nus': (0.5, 0.8), 'betas': (0.9, 0.99), 'weight_decay': 0.01}}),
    'Larc': ('Larc', {'default': {}, 'wd': {'weight_decay': 0.01, 'trust_coefficient': 0.05},
                      'no_momentum': {'momentum': 0.}}),
    'LARS': ('Larc', {'l2': {'weight_decay': 0.01, 'decoupled_weight_decay': False}}),
    'ScheduleFreeAdamW': ('ScheduleFreeAdam', {'default': {}, 'wd': {'weight_decay': 0.01, 'warmup_steps': 5},
                                               'l2': {'weight_decay': 0.01, 'decoupled_weight_decay': False}}),
    'Adam': ('Adam', {'l2': {'weight_decay': 0.1}}),
    'AdamW': ('Adam', {'wd': {'weight_decay': 0.1, 'betas': (0.8, 0.9)}}),
    'SGD': ('SGD', {'momentum_l2': {'momentum': 0.9, 'weight_decay': 0.01}}),
    'RMSprop': ('RMSProp', {'plain_l2': {'alpha': 0.9, 'weight_decay': 0.01, 'eps': 1e-3}}),
    'Adafactor': ('Adafactor', {'wd': {'weight_decay': 0.1, 'eps': (1e-6, 1e-2), 'd': 2.}}),
}
REFERENCE_EQUIVALENTS = {
    'Lion': ('optimi', 'Lion', {'wd': {'betas': (0.8, 0.95), 'weight_decay': 0.1}}),
    'Adan': ('optimi', 'Adan', {'default': {}}),
    'StableAdamW': ('optimi', 'StableAdamW', {'default': {}, 'wd': {'weight_decay': 0.1, 'eps': 1e-8}}),
    'ScheduleFreeAdamW': ('schedulefree', 'AdamWScheduleFree', {
        'default': {}, 'warmup': {'warmup_steps': 10, 'r': 1., 'weight_lr_power': 1., 'betas': (0.8, 0.99),
                                  'weight_decay': 0.01}})}
