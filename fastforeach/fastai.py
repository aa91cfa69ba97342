"""The fastai face of the core: `ForEachOptimizer`, a `fastai.optimizer.Optimizer` whose `step` is the core's.

fastai's `Optimizer` keeps the param groups (`param_lists`), their hypers (`hypers`), the per-param state
(`state`), and hyper schedules (`set_hyper`); the core (`core/`) steps them without knowing these
containers. What this face adds: fastai's checks of its input, its `zero_grad` in place, its state dicts
(lists in param order), and fastai's own steppers for 16-bit params rounded to nearest.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from fastai.optimizer import Optimizer
from fastcore.foundation import L

from .checkpoint import TorchOptimizerView
from .core import Core

__all__ = ['ForEachOptimizer', 'check_params', 'fastai_steppers']


def check_params(params: L) -> None:
    "Raise `TypeError` for torch.optim-style param groups (dicts): fastai's optimizers take lists of tensors."
    for group in params:
        if isinstance(group, dict):
            raise TypeError("Invalid params: a param group given as a dict (torch.optim style, as "
                            "ZeroRedundancyOptimizer passes them). fastai-style optimizers take a list of tensors, "
                            "or a list of lists for several groups, with hypers as keywords; to shard optimizer "
                            "state across ranks, shard the model with FSDP2 (torch.distributed.fsdp.fully_shard)")


def fastai_steppers(factory: Callable, n_groups: int, **options) -> list:
    """The stepper callbacks of the optimizer fastai's `factory` builds with `options` (lr among them) for
    `n_groups` param groups: per-group hypers (lists, slices) are spread over as many groups as they were given for."""
    return list(factory([[torch.zeros(1)] for _ in range(n_groups)], **options).cbs)


class ForEachOptimizer(Optimizer):
    """A fastai `Optimizer` that updates whole lists of tensors with one step rule (see `core/`).

    `opt_step` is a step rule (see `rules.py`) or a `FusedStep` (see `fused/`): the same rule done in one pass
    over memory, weight decay included. Weight decay comes first, as in fastai, on the params whose state
    does not say `do_wd=False`: decoupled, `p ← p·(1 − lr·wd)`, or L2, `g ← g + wd·p`.

    16-bit params (bfloat16, float16) are stepped as `rounding` says (see `precision.py`): on float32 working
    values written back with Kahan summation (`'kahan'`, its buffer in `kahan_dtype`), as 24-bit masters
    (`'master24'`, bf16 and a byte) or by stochastic rounding (`'stochastic'`), or, with `'nearest'`, by the
    steppers of the optimizer that fastai's factory `fastai` builds with the same hypers and `fastai_options`,
    bit for bit as fastai does (without `fastai`, the rule steps them as they are, each op rounded to 16 bits).
    `state_format`: averages in 8 or 4 bits (see `lowbit.py`).
    """
    def __init__(self, params, opt_step: Callable, decouple_wd: bool = True, *, rounding: str = 'kahan',
                 kahan_dtype: torch.dtype = torch.float32, state_format=None, fastai: Callable | None = None,
                 fastai_options: dict = None, **defaults):
        self.core = Core(opt_step, decouple_wd, rounding, kahan_dtype, state_format=state_format)
        missing = [h for h in self.core.rule.hypers if h not in defaults]
        if missing: raise TypeError(f"{self.core.rule.name} needs hypers {missing}; give them as keywords")
        params = L(params)  # as fastai reads it: a lone tensor is one param, a list of lists is param groups
        if not params: raise ValueError("Invalid params: an empty list (the optimizer has nothing to update)")
        check_params(params)
        super().__init__(params, cbs=[], **defaults)
        if fastai is not None:  # fastai's own steppers: how 16-bit params are stepped with rounding='nearest'
            self.core.steppers = fastai_steppers(fastai, len(self.param_lists), decouple_wd=decouple_wd, **defaults,
                                                 **(fastai_options or {}))
        self.core.hold([p for pg in self.param_lists for p in pg])

    # What the core holds, as attributes of the optimizer.
    rule = property(lambda self: self.core.rule)
    rounding = property(lambda self: self.core.rounding)
    decouple_wd = property(lambda self: self.core.decouple_wd)
    fused_steps = property(lambda self: self.core.fused_steps, doc="The fused steps this optimizer runs.")
    fused_plans = property(lambda self: self.core.plans, doc="What its fused steps keep between steps.")
    fused = property(lambda self: self.core.routes[0].fused)
    accumulation = property(lambda self: self.core.accumulation,
                            lambda self, v: setattr(self.core, 'accumulation', v),
                            doc="(micro-batch index, number of micro-batches) while optimizer accumulation is on.")

    def __iter__(self):
        """This optimizer as a `torch.optim.Optimizer` (`checkpoint.TorchOptimizerView`): torch.distributed.checkpoint's
        `get_optimizer_state_dict(model, optimizers)` takes an optimizer or an iterable of them."""
        yield TorchOptimizerView(self)

    def _set_hyper(self, k, v):
        v = list(v)
        self.core.check_hypers([{k: value} for value in v])
        super()._set_hyper(k, v)

    def check_hypers(self) -> None:
        "Validate every group's hypers; raise `ValueError` before anything is modified."
        self.core.check_hypers(list(self.hypers))

    def zero_grad(self):
        """fastai's `zero_grad`, in place, as one foreach op. Gradients may be views of a pack's buffer (see
        `fused.Pack`), which fastai's own `detach_()` refuses."""
        grads = [p.grad for pg in self.param_lists for p in pg if p.grad is not None]
        for g in grads:
            if g.grad_fn is not None: g.detach_()
            else: g.requires_grad_(False)
        if grads: torch._foreach_zero_(grads)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        self.check_hypers()
        with torch.no_grad(): self._step_all()
        return loss

    def step_params(self, params) -> None:
        "A step of only `params` (those of them with a gradient): one bucket of a gradient release (see `callbacks/release.py`)."
        self.check_hypers()
        with torch.no_grad(): self._step_all({id(p) for p in params})

    def _step_all(self, only: set | None = None) -> None:
        self.core.step(zip(self.hypers, self.param_lists), self.state, only)

    def check_accumulation(self) -> None: self.core.check_accumulation(type(self).__name__)

    def finish_step(self) -> None:
        "What follows the steps of every bucket of a gradient release: nothing here (Lookahead counts and syncs)."

    def _keeps_comp(self, p) -> bool: return self.core.keeps_comp(p)

    def check_state_dict(self, sd: dict) -> None:
        "Raise `ValueError` saying which group, param and key of `sd` does not fit this optimizer."
        if not isinstance(sd, dict) or 'state' not in sd or 'hypers' not in sd:
            raise ValueError("Invalid state dict: expected a dict with 'state' and 'hypers'")
        n_groups, n_params = len(self.param_lists), sum(len(pg) for pg in self.param_lists)
        if len(sd['hypers']) != n_groups:
            raise ValueError(f"Invalid state dict: {len(sd['hypers'])} param groups, the optimizer has {n_groups}")
        if len(sd['state']) != n_params:
            raise ValueError(f"Invalid state dict: {len(sd['state'])} params, the optimizer has {n_params}")
        self.core.check_state(self.param_lists, sd['state'], sd['hypers'])

    def fastai_state_dict(self) -> dict:
        "`state_dict()` with any state kept in few bits decoded: fastai's own layout, which fastai's optimizer loads."
        params = [p for pg in self.param_lists for p in pg]
        return {'state': [self.core.plain_state(p, self.state[p]) for p in params], 'hypers': self.hypers}

    def load_state_dict(self, sd: dict):
        "Load a state dict saved by this optimizer or by fastai's native one of the same kind."
        self.check_state_dict(sd)
        params = [p for pg in self.param_lists for p in pg]
        state = defaultdict(dict)
        for p, s in zip(params, sd['state']): state[p] = self.core.load_state(p, s)
        self.hypers = type(self.hypers)(dict(h) for h in sd['hypers'])
        self.state = state
