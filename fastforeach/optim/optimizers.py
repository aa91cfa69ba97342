"""torch.optim's optimizers, with torch's names, defaults and state keys, stepped by fastforeach's core."""
from __future__ import annotations

import torch

from ..optimizers.adafactor import ADAFACTOR_STEPS, HYPERS as ADAFACTOR_HYPERS
from ..optimizers.adam import adam_step, fused_adam_step
from ..optimizers.muon import NS_COEFFICIENTS, NS_EPS, NS_METHODS, fused_muon_step, muon_step
from ..optimizers.radam import fused_torch_radam_step, torch_radam_step
from ..optimizers.rmsprop import torch_rmsprop_steps
from ..optimizers.sgd import fused_sgd_step, fused_torch_sgd_step, sgd_step, torch_sgd_step
from ..rules import FRACTION, choice, count
from .base import TorchForEachOptimizer, _float

__all__ = ['Adam', 'AdamW', 'RAdam', 'SGD', 'RMSprop', 'Muon', 'Adafactor', 'TORCH_EQUIVALENTS']


# torch.optim.Muon's `adjust_lr_fn` and the core's `adjust_lr` for each.
MUON_LR_ADJUSTMENTS = {None: 'original', 'original': 'original', 'match_rms_adamw': 'match_rms_adamw'}

class Adam(TorchForEachOptimizer):
    """torch.optim.Adam: m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;
    p ← p − lr·(m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + eps), after L2 weight decay (g ← g + wd·p), or after
    decoupled weight decay (p ← p·(1 − lr·wd)) with `decoupled_weight_decay=True`, as `AdamW` does.
    Options torch has and this face does not do (`amsgrad`, `maximize`, `capturable`, `differentiable`)
    are refused when set."""
    names = {'lr': 'lr', 'betas': ('mom', 'sqr_mom'), 'eps': 'eps', 'weight_decay': 'wd'}
    rules = (adam_step, fused_adam_step)
    state_names = {'grad_avg': 'exp_avg', 'sqr_avg': 'exp_avg_sq'}
    refused = {'amsgrad': False, 'maximize': False, 'capturable': False, 'differentiable': False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0., amsgrad=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False,
                 no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, decoupled_weight_decay=decoupled_weight_decay)



class AdamW(Adam):
    """torch.optim.AdamW: `Adam` with decoupled weight decay, p ← p·(1 − lr·wd), and weight_decay 0.01."""
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None, no_wd=None, rounding='kahan',
                 kahan_dtype=torch.float32, state_format=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
                         no_wd=no_wd, rounding=rounding, kahan_dtype=kahan_dtype, state_format=state_format)



class RAdam(TorchForEachOptimizer):
    """torch.optim.RAdam: Adam's averages; once the variance estimate is past its first steps (ρₜ > 5),
    p ← p − lr·r·(m / (1 − β1ᵗ))·√(1 − β2ᵗ) / (√v + eps), r the rectification, before that
    p ← p − lr·m / (1 − β1ᵗ); L2 weight decay, or decoupled with `decoupled_weight_decay=True`.
    fastai's RAdam adds eps after debiasing v (√(v / (1 − β2ᵗ)) + eps)."""
    names, state_names = Adam.names, Adam.state_names
    rules = (torch_radam_step, fused_torch_radam_step)
    refused = {'maximize': False, 'capturable': False, 'differentiable': False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0., decoupled_weight_decay=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None, no_wd=None,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
                        capturable=capturable, differentiable=differentiable, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format, decoupled_weight_decay=decoupled_weight_decay)

class SGD(TorchForEachOptimizer):
    """torch.optim.SGD: g ← g + wd·p;  with momentum, buf ← g on the first step, then
    momentum·buf + (1 − dampening)·g, and p ← p − lr·(g + momentum·buf) with nesterov, else p − lr·buf;
    without, p ← p − lr·g. `maximize` and `differentiable` are refused when set."""
    state_names = {'grad_avg': 'momentum_buffer', 'step': None}  # torch keeps no step count for SGD
    refused = {'maximize': False, 'differentiable': False}

    def __init__(self, params, lr=1e-3, momentum=0., dampening=0., weight_decay=0., nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format)

    def check_group(self, group, where=''):
        super().check_group(group, where)
        if group.get('nesterov') and (group.get('momentum', 0) <= 0 or group.get('dampening', 0) != 0):
            raise ValueError(f"Invalid nesterov{where}: True with momentum {group.get('momentum')!r} and dampening "
                             f"{group.get('dampening')!r} (Nesterov momentum needs a momentum and zero dampening)")

    def hypers(self, group):
        momentum = group['momentum']
        return {'lr': group['lr'], 'mom': momentum, 'dampening': group['dampening'] if momentum else 0.,
                'nesterov': group['nesterov'], 'wd': group['weight_decay']}

    def rule(self, groups, fused):
        if any(group['momentum'] for group in groups): return fused_torch_sgd_step if fused else torch_sgd_step
        return fused_sgd_step if fused else sgd_step

    def state_dict(self):
        "torch's SGD state dict: a group without momentum saves no buffer (its params' `momentum_buffer` is None)."
        sd = super().state_dict()
        for group in sd['param_groups']:
            if group['momentum']: continue
            for i in group['params']:
                if i in sd['state']: sd['state'][i] = {'momentum_buffer': None}
        return sd

    def imported(self, state, i):
        "A saved momentum buffer with a step count (torch's SGD keeps none): past the first step, whatever it was."
        state = super().imported(state, i)
        if 'grad_avg' in state and 'step' not in state: state['step'] = 1
        return state



class RMSprop(TorchForEachOptimizer):
    """torch.optim.RMSprop: g ← g + wd·p;  v ← α·v + (1 − α)·g²;  with `centered`, ḡ ← α·ḡ + (1 − α)·g and
    d = √(v − ḡ²) + eps, else d = √v + eps;  with momentum, buf ← momentum·buf + g/d and p ← p − lr·buf,
    else p ← p − lr·g/d. (fastai's RMSProp averages the gradient itself for its momentum.) `centered` is
    one choice for every group. `capturable`, `maximize` and `differentiable` are refused when set."""
    names = {'lr': 'lr', 'alpha': 'sqr_mom', 'eps': 'eps', 'weight_decay': 'wd', 'momentum': 'mom'}
    state_names = {'sqr_avg': 'square_avg', 'grad_avg': 'grad_avg', 'momentum_buffer': 'momentum_buffer'}
    refused = {'capturable': False, 'maximize': False, 'differentiable': False}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0., momentum=0., centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, fused=None, no_wd=None,
                 rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable)
        self.centered = None  # every group's, once built
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format)

    def check_group(self, group, where=''):
        super().check_group(group, where)
        centered = group.get('centered', False)
        if not isinstance(centered, bool): raise ValueError(f"Invalid centered{where}: {centered!r} (must be True or False)")
        FRACTION('alpha', group.get('alpha', 0.), where)
        if self.centered is not None and centered != self.centered:
            raise ValueError(f"Invalid centered{where}: {centered!r} (this RMSprop's groups are all "
                             f"centered={self.centered}: one choice for every group)")

    def imported(self, state, i):
        "A saved state without a step count (the fastai face's RMSProp keeps none; the update does not use it) counts from 1."
        state = super().imported(state, i)
        if 'sqr_avg' in state and 'step' not in state: state['step'] = 1
        return state

    def rule(self, groups, fused):
        centered = {g['centered'] for g in groups}
        if len(centered) > 1:
            raise ValueError("Invalid centered: True for some param groups and False for others (one choice for every group)")
        self.centered = centered.pop()
        foreach_rule, fused_rule = torch_rmsprop_steps[self.centered, any(g['momentum'] for g in groups)]
        return fused_rule if fused else foreach_rule

def _adafactor_eps(name, value, where):
    "torch's Adafactor `eps`: (eps1, eps2), eps1 None (the machine epsilon of the update's dtype) or >= 0, eps2 >= 0."
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be 2 numbers: eps1, None or >= 0, and eps2 >= 0)")
    if value[0] is not None: _float(ADAFACTOR_HYPERS['eps1'])(f"{name}[0]", value[0], where)
    _float(ADAFACTOR_HYPERS['eps2'])(f"{name}[1]", value[1], where)


class Adafactor(TorchForEachOptimizer):
    """torch.optim.Adafactor: for a param of 2 dims or more, row_var and col_var, its gradient's squares
    averaged over each row and each column (β₂ = 1 − t^beta2_decay at step t), v = row_var ⊗ col_var /
    max(mean(row_var), eps1); for the others, variance, the squares' average itself;  α = max(eps2,
    RMS(p))·min(lr, 1/√t);  p ← p·(1 − lr·weight_decay);  u = g / √max(v, eps1²);  p ← p − α·u / max(1,
    RMS(u)/d). eps1 None: the machine epsilon of the dtype the update is computed in (float32 for 16-bit
    params, which fastforeach steps in float32; torch takes the param's). Weight decay is decoupled, as
    torch's. `maximize` is refused when set."""
    names = {'lr': 'lr', 'beta2_decay': 'beta2_decay', 'eps': ('eps1', 'eps2'), 'd': 'd', 'weight_decay': 'wd'}
    rules = (ADAFACTOR_STEPS[False], ADAFACTOR_STEPS[True])
    refused = {'maximize': False}
    checks = {'eps': _adafactor_eps, 'beta2_decay': _float(ADAFACTOR_HYPERS['beta2_decay']),
              'd': _float(ADAFACTOR_HYPERS['d'])}
    decouple_wd = True

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1., weight_decay=0., *, foreach=None,
                 maximize=False, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format)

    def hypers(self, group):
        out = super().hypers(group)
        if out['eps1'] is None: out['eps1'] = 'auto'
        return out


# Each class beside torch.optim's own optimizer of the same math, with configs (torch's keywords) that
# cover its options: what the tests hold the torch face to.
TORCH_EQUIVALENTS = {
    'SGD': (SGD, torch.optim.SGD, {'plain': {}, 'l2': {'weight_decay': 0.01}, 'momentum': {'momentum': 0.9},
                                   'dampening': {'momentum': 0.9, 'dampening': 0.1, 'weight_decay': 0.01},
                                   'nesterov': {'momentum': 0.8, 'nesterov': True, 'weight_decay': 0.01}}),
    'Adam': (Adam, torch.optim.Adam, {'default': {}, 'l2': {'weight_decay': 0.1},
                                      'betas_eps': {'betas': (0.8, 0.9), 'eps': 1e-3},
                                      'decoupled': {'weight_decay': 0.1, 'decoupled_weight_decay': True}}),
    'AdamW': (AdamW, torch.optim.AdamW, {'default': {}, 'wd': {'weight_decay': 0.1}}),
    'RAdam': (RAdam, torch.optim.RAdam, {'default': {}, 'l2': {'weight_decay': 0.1, 'eps': 1e-3},
                                         'decoupled': {'weight_decay': 0.1, 'decoupled_weight_decay': True,
                                                       'betas': (0.8, 0.9)}}),
    'RMSprop': (RMSprop, torch.optim.RMSprop, {'default': {}, 'l2': {'weight_decay': 0.01, 'eps': 1e-3},
                                               'momentum': {'momentum': 0.9, 'alpha': 0.9},
                                               'centered': {'centered': True, 'weight_decay': 0.01},
                                               'centered_momentum': {'centered': True, 'momentum': 0.8}}),
    'Adafactor': (Adafactor, torch.optim.Adafactor, {'default': {}, 'wd': {'weight_decay': 0.1},
                                                     'eps_d': {'eps': (1e-6, 1e-2), 'd': 2., 'beta2_decay': -0.5}}),
}


class Muon(TorchForEachOptimizer):
    """torch.optim.Muon: buf ← momentum·buf + (1 − momentum)·g;  u = (1 − momentum)·g + momentum·buf with
    `nesterov`, else buf;  p ← p·(1 − lr·wd) − adjusted_lr·NS(u), NS the Newton-Schulz orthogonalisation
    (torch's quintic, `ns_steps` iterations) and adjusted_lr as `adjust_lr_fn` says (None: 'original',
    lr·√max(1, rows/cols); 'match_rms_adamw': lr·0.2·√max(rows, cols)). Like torch's, it takes 2-d params
    only (the fastai face's `Muon` routes the others to AdamW). Matrices of one shape are orthogonalised
    together; `ns_dtype` (bf16, as torch) and `ns_method` ('standard', torch's iteration on X; 'gram', the
    same polynomial in XXᵀ where that saves arithmetic) say how. torch's coefficients and eps only."""
    names = {'lr': 'lr', 'momentum': 'mom', 'nesterov': 'nesterov', 'ns_steps': 'ns_steps', 'weight_decay': 'wd'}
    rules = (muon_step, fused_muon_step)
    state_names = {'grad_avg': 'momentum_buffer'}
    refused = {'ns_coefficients': NS_COEFFICIENTS, 'eps': NS_EPS}
    decouple_wd = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS,
                 eps=NS_EPS, ns_steps=5, adjust_lr_fn=None, *, ns_dtype=torch.bfloat16, ns_method='standard',
                 foreach=None, fused=None, no_wd=None, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        self.ns_dtype, self.ns_method = ns_dtype, ns_method
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults, foreach=foreach, fused=fused, no_wd=no_wd, rounding=rounding,
                         kahan_dtype=kahan_dtype, state_format=state_format)

    def check_group(self, group, where=''):
        super().check_group(group, where)
        fn = group.get('adjust_lr_fn')
        if fn not in MUON_LR_ADJUSTMENTS:
            raise ValueError(f"Invalid adjust_lr_fn{where}: {fn!r} (must be one of {tuple(MUON_LR_ADJUSTMENTS)})")
        if 'momentum' in group: FRACTION('momentum', group['momentum'], where)
        if 'ns_steps' in group: count(1, 100)('ns_steps', group['ns_steps'], where)
        choice(*NS_METHODS)('ns_method', self.ns_method, where)

    def add_param_group(self, param_group):
        "torch's, its params refused unless 2-d (checked once: a param keeps its shape)."
        params = param_group['params']
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p
            if p.ndim != 2:
                raise ValueError(f"Invalid params for param group {len(self.param_groups)}: a param of shape "
                                 f"{tuple(p.shape)} (Muon takes 2-d matrices, as torch.optim.Muon; fastforeach.Muon "
                                 "routes the others to AdamW)")
        super().add_param_group({**param_group, 'params': params})

    def hypers(self, group):
        return {**super().hypers(group), 'adjust_lr': MUON_LR_ADJUSTMENTS[group['adjust_lr_fn']],
                'ns_dtype': self.ns_dtype, 'ns_method': self.ns_method}
