"""Training a fastai Learner in pure bfloat16: `learn.to_pure_bf16()`.

fastai's `to_bf16()` is mixed precision: float32 params, bf16 computation. Pure bf16 keeps the params,
their gradients and the optimizer's state in bf16 (2 bytes each, where mixed precision keeps 4 for each
param and gradient), and computes the loss and the metrics in float32. What plain bf16 loses, updates
under half a bf16 ulp of their weight, fastforeach's optimizers keep with Kahan summation (their default
for 16-bit params, see `precision.py`).
"""
from __future__ import annotations

import warnings

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastcore.basics import patch

from ..core import inner_optimizer
from ..precision import COMP, kahan_split

__all__ = ['PureBF16', 'to_pure_bf16', 'model_to_bf16']

BF16 = torch.bfloat16


def model_to_bf16(model: torch.nn.Module, opt=None) -> None:
    """`model`'s float params and buffers in bf16, in place (the same Parameter objects, so an optimizer
    built over them goes on). For each float32 param, what rounding to bf16 takes off is kept in `opt`'s
    buffer when `opt` is a fastforeach optimizer that keeps one (Kahan's; a 24-bit master's byte, to 1/256
    of an ulp), so that nothing of the weight is lost at the switch; `opt`'s state shaped like a param is cast to bf16 with it."""
    inner = inner_optimizer(opt) if opt is not None else None
    keeps = getattr(inner, '_keeps_comp', None)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or p.dtype == BF16: continue
            p16 = p.to(BF16)
            state = inner.state[p] if inner is not None else {}
            for key, value in list(state.items()):
                if key != COMP and isinstance(value, torch.Tensor) and value.shape == p.shape:
                    state[key] = value.to(BF16)
            if keeps is not None and keeps(p16):
                w = p.float() + state[COMP].float() if COMP in state else p.float()
                p16, state[COMP] = kahan_split(w, BF16, inner.rounding.comp_dtype)
            p.data = p16
        for b in model.buffers():
            if b.is_floating_point(): b.data = b.to(BF16)


def _to(x, dtype):
    if isinstance(x, torch.Tensor): return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)): return type(x)(_to(o, dtype) for o in x)
    return x


class PureBF16(Callback):
    """Pure bf16 training (see the module docstring): at the start of each fit the model goes to bf16 if
    it is not there yet (`model_to_bf16`, seeding Kahan buffers), each batch's inputs are cast to bf16, and
    the predictions to float32 before the loss and metrics."""
    order = 10  # with fastai's MixedPrecision, which this replaces

    def before_fit(self):
        opt = inner_optimizer(self.learn.opt)
        if not hasattr(opt, 'rounding'):
            dropped = [s.pop(COMP) for s in opt.state.values() if COMP in s]
            if dropped:
                warnings.warn(f"{type(opt).__name__} has no Kahan summation: dropping the {len(dropped)} "
                              f"compensation buffers ({COMP!r}) of the loaded state; its bf16 steps round to "
                              "nearest", RuntimeWarning)
        model_to_bf16(self.learn.model, self.learn.opt)

    def before_batch(self): self.learn.xb = _to(self.xb, BF16)
    def after_pred(self): self.learn.pred = _to(self.pred, torch.float32)


@patch
def to_pure_bf16(self: Learner) -> Learner:
    """Train in pure bf16 (see `PureBF16`). The model goes to bf16 now, with the optimizer created first if
    there is none yet, so that its Kahan buffers keep what rounding takes off the float32 weights, and so
    that `load` then brings a pure-bf16 checkpoint back whole (its Kahan buffers included)."""
    if self.opt is None: self.create_opt()
    model_to_bf16(self.model, self.opt)
    self.add_cb(PureBF16())
    return self
