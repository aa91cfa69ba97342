"""The published implementations the optimizers fastai lacks are held to (tests) and timed against (benchmark).

Each `Reference` builds the reference `torch.optim.Optimizer` with the hypers mapped from fastforeach's
(fastai's vocabulary), from torch-style param groups (weight decay 0 for the params fastai marks
`do_wd=False`, as the references have no such flag), and says where its state holds what fastforeach's
holds. The references are test dependencies (`pip install -e ".[test]"`), imported only when used.

Where they differ from fastforeach, by design:
- optimi's Adam-style averages are kept debiased (its betas are "debiased betas"); fastforeach keeps
  fastai's undebiased `grad_avg`/`sqr_avg` and divides at each step: the same update.
- optimi's Adan stores minus the previous gradient; fastforeach the gradient.
- Adan's decoupled weight decay is the paper's proximal p / (1 + lr·wd) after the step in both (optimi
  0.3.3's `adam_wd=True` would change that, but its `step` does not pass the flag on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ['Reference', 'REFERENCES', 'reference_groups']


@dataclass(frozen=True)
class Reference:
    package: str            # what to install for it
    build: Callable         # (torch-style param groups, lr, foreach, **fastforeach options) -> torch optimizer
    # fastforeach state key -> (the reference's key, or keys of which one is there, f(reference value, step,
    # options) -> fastforeach's value); a key neither holds for a param (Muon's routes) is skipped
    state: dict


def _debiased(beta_name: str, default: float):
    "The reference's debiased average back to fastai's undebiased one at `step`."
    return lambda value, step, options: value * (1 - options.get(beta_name, default) ** step)


def _optimi_lion(groups, lr, foreach, beta1=0.9, beta2=0.99, wd=0.1, decouple_wd=True):
    import optimi
    return optimi.Lion(_with_wd(groups, wd), lr=lr, betas=(beta1, beta2), weight_decay=wd, foreach=foreach)


def _optimi_adan(groups, lr, foreach, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, wd=0.02, decouple_wd=True):
    import optimi
    return optimi.Adan(_with_wd(groups, wd), lr=lr, betas=(beta1, beta2, beta3), eps=eps, weight_decay=wd,
                       foreach=foreach)


def _optimi_stable_adamw(groups, lr, foreach, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=0.01, decouple_wd=True):
    import optimi
    return optimi.StableAdamW(_with_wd(groups, wd), lr=lr, betas=(mom, sqr_mom), eps=eps, weight_decay=wd,
                              foreach=foreach)


def _schedule_free_adamw(groups, lr, foreach, beta1=0.9, sqr_mom=0.999, eps=1e-8, wd=0., decouple_wd=True, warmup_steps=0,
                         r=0., weight_lr_power=2.):
    import schedulefree
    opt = schedulefree.AdamWScheduleFree(_with_wd(groups, wd), lr=lr, betas=(beta1, sqr_mom), eps=eps, weight_decay=wd,
                                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, foreach=foreach)
    opt.train()
    return opt


def _torch_muon(groups, lr, foreach, mom=0.95, sqr_mom=0.95, eps=1e-8, wd=0.1, decouple_wd=True, nesterov=True,
                ns_steps=5, ns_dtype=torch.bfloat16, ns_method='gram', adjust_lr='match_rms_adamw', route=None):
    """torch.optim.Muon for the params the route picks (given as their matrices: torch's takes 2-d params
    only), torch.optim.AdamW for the others; Newton-Schulz in bf16 as torch does, or in `ns_dtype` (float64
    for the tests' exact comparison: torch's cast to bf16 taken out). Torch iterates on X whatever
    `ns_method` says: the Gram iteration is the same polynomial in XXᵀ, equal in float64."""
    from ..optimizers.muon import default_route
    route = route or default_route([[p for g in groups if g['fastai_group'] == i for p in g['params']]
                                    for i in range(max(g['fastai_group'] for g in groups) + 1)])
    muon, adamw = [], []
    for g in _with_wd(groups, wd):
        ps = g['params']
        matrices = [p for p in ps if route(p)]
        if matrices: muon.append({**g, 'params': [p.detach().view(p.shape[0], -1) for p in matrices], 'of': matrices})
        others = [p for p in ps if not route(p)]
        if others: adamw.append({**g, 'params': others})
    fn = None if adjust_lr == 'match_rms_adamw' or adjust_lr == 'original' else adjust_lr
    opts = [torch.optim.AdamW(adamw, lr, betas=(mom, sqr_mom), eps=eps, foreach=foreach)] if adamw else []
    if muon:
        opts.append(torch.optim.Muon(muon, lr, momentum=mom, nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=fn or adjust_lr))
    return _Together(opts, None if ns_dtype == torch.bfloat16 else ns_dtype)


class _Together:
    """Torch optimizers stepped as one, over the params fastforeach's optimizer holds: Muon's matrices are
    views of them, given their gradients before each step. `state[p]` is p's state, wherever it is."""
    def __init__(self, opts, ns_dtype):
        self.opts, self.ns_dtype = opts, ns_dtype

    @property
    def param_groups(self): return [g for o in self.opts for g in o.param_groups]

    @property
    def state(self):
        found = {}
        for o in self.opts:
            for g in o.param_groups:
                for view, p in zip(g['params'], g.get('of', g['params'])):
                    if view in o.state: found[p] = o.state[view]
        return found

    def step(self):
        import torch.optim._muon as torch_muon
        for g in self.param_groups:
            for view, p in zip(g['params'], g.get('of', g['params'])):
                if view is not p: view.grad = None if p.grad is None else p.grad.view(view.shape)
        cast = torch_muon._zeropower_via_newtonschulz
        if self.ns_dtype is not None:  # torch's iteration in ns_dtype: its bf16 cast made a no-op
            def in_dtype(grad, *args, **kwargs):
                real = torch.Tensor.bfloat16
                torch.Tensor.bfloat16 = lambda t: t.to(self.ns_dtype, copy=True)  # a copy, as the cast makes
                try: return cast(grad, *args, **kwargs)
                finally: torch.Tensor.bfloat16 = real
            torch_muon._zeropower_via_newtonschulz = in_dtype
        try:
            for o in self.opts: o.step()
        finally: torch_muon._zeropower_via_newtonschulz = cast


def _torch_adafactor(groups, lr, foreach, beta2_decay=-0.8, eps1='auto', eps2=1e-3, d=1., wd=0., decouple_wd=True):
    return torch.optim.Adafactor(_with_wd(groups, wd), lr=lr, beta2_decay=beta2_decay,
                                 eps=(None if eps1 == 'auto' else eps1, eps2), d=d, weight_decay=wd, foreach=foreach)


def _with_wd(groups, wd):
    return [{**g, 'weight_decay': wd if g['do_wd'] else 0.} for g in groups]


REFERENCES: dict[str, Reference] = {
    'Lion': Reference('torch-optimi', _optimi_lion, {'grad_avg': ('exp_avg', lambda v, step, o: v)}),
    'Adan': Reference('torch-optimi', _optimi_adan, {
        'grad_avg': ('exp_avg', _debiased('beta1', 0.98)), 'diff_avg': ('exp_avg_diff', _debiased('beta2', 0.92)),
        'sqr_avg': ('exp_avg_sq', _debiased('beta3', 0.99)), 'prev_grad': ('prev_grad', lambda v, step, o: -v)}),
    'StableAdam': Reference('torch-optimi', _optimi_stable_adamw, {
        'grad_avg': ('exp_avg', _debiased('mom', 0.9)), 'sqr_avg': ('exp_avg_sq', _debiased('sqr_mom', 0.99))}),
    'ScheduleFreeAdam': Reference('schedulefree', _schedule_free_adamw, {
        'z': ('z', lambda v, step, o: v), 'sqr_avg': ('exp_avg_sq', lambda v, step, o: v)}),
    'Muon': Reference('torch', _torch_muon, {
        'grad_avg': (('momentum_buffer', 'exp_avg'), lambda v, step, o: v), 'sqr_avg': ('exp_avg_sq', lambda v, step, o: v)}),
    'Adafactor': Reference('torch', _torch_adafactor, {key: (key, lambda v, step, o: v) for key in ('row_var', 'col_var', 'variance')}),
}


def reference_groups(param_groups: list[list[torch.Tensor]], do_wd: Callable) -> list[dict]:
    """torch-style param groups for a reference: each fastai group split in two by `do_wd(p)`, each dict
    remembering its fastai group (`fastai_group`) so that per-group hypers can be set alike."""
    groups = []
    for i, params in enumerate(param_groups):
        for flag in (True, False):
            chosen = [p for p in params if bool(do_wd(p)) == flag]
            if chosen: groups.append({'params': chosen, 'do_wd': flag, 'fastai_group': i})
    return groups
