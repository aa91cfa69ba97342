"""Rules whose state is not shaped like its param (Adafactor's row and column statistics), done by one
compiled update per param (`TensorwiseStep`)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import device_tensor
from ..precision import Rounding
from ..rules import StepRule
from .coefficients import Coefficients
from .compile import PLAIN, _compiled, _compiles, _seeds, coefficient_dtype
from .steps import PLAIN_CONTEXT, FusedStep, split_by_wd

__all__ = ['TensorwiseStep']


def _seen_as(t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`t` with its leading dims flattened into one, so that it has `ndim` dims (1: flat): a view where its
    strides allow, else a copy, also returned second, to be copied back into `t` once written."""
    shape = (-1, *t.shape[t.ndim - ndim + 1:]) if ndim > 1 else (-1,)
    try: return t.view(shape), None
    except RuntimeError:  # a channels-last kernel seen as a stack of its last two dims
        copy = t.reshape(shape).clone()
        return copy, copy


class TensorwiseStep(FusedStep):
    """A rule done by its compiled `update(p, g, *state, c)`, one param at a time: each param's tensors
    (param, gradient, state, Kahan buffer) seen with `ndim` dims, their leading dims flattened, so that one
    graph serves every param (3 for a factored rule: a stack of matrices). `c` is laid out as `layout`:
    the decay factors (the decoupled factor 1 − lr·wd, or 1; the L2 factor wd, or 0), then what
    `coefficients(dtype=..., **hypers)` gives by name, `dtype` being the one the update computes in.

    Its state may have any shape (`param_shaped` False): reductions over a param's rows or columns in one
    graph. The update does the weight decay itself, where its rule wants it (Adafactor: after it has read
    the param's RMS). 16-bit params stepped in float32 are written back in the same call (see `_runner`)."""
    param_shaped = False

    def __init__(self, rule: Callable, update: Callable, coefficients: Callable, layout: Coefficients, ndim: int):
        super().__init__(rule)
        self.update, self.coefficients, self.layout, self.ndim = update, coefficients, layout, ndim

    def ready(self, p, hypers, rounding: Rounding | None = None) -> bool:
        "Whether the update compiled for params like `p` (written back as `rounding` says, for 16-bit params)."
        rule, mode = StepRule.of(self.rule), rounding.mode if rounding is not None else None
        states = tuple(rule.state[k].dtype_for(p) for k in rule.state_keys)
        comps = (rounding.kahan_dtype,) if rounding is not None and rounding.kahan else ()

        def attempt():
            # Sizes as large as real weights': inductor plans its loops (threads, vector width) from the first.
            like = torch.ones((8,) * (self.ndim - 1) + (1 << 16 >> 3 * (self.ndim - 1),), dtype=p.dtype, device=p.device)
            tensors = [like, torch.ones_like(like), *(rule.state[k].zeros(like, dtype) for k, dtype in zip(rule.state_keys, states)),
                       *(torch.zeros_like(like, dtype=dtype) for dtype in comps)]
            self._call([tensors], torch.zeros(len(self.layout), dtype=coefficient_dtype(p.dtype), device=p.device), mode)
        return _compiles((self.update, p.dtype, states, comps, p.device.type, mode), [self.update], p, attempt)

    def _call(self, per_param: list[list[torch.Tensor]], c: torch.Tensor, rounding: str | None) -> None:
        "The compiled update on each param's tensors (param, gradient, state, then its Kahan buffer with 'kahan')."
        fn = _compiled(self.update, PLAIN, per_param[0][0].dtype, per_param[0][0].device.type, rounding)
        for tensors in per_param:
            seen = [_seen_as(t, self.ndim) for t in tensors]
            seeds = [_seeds(tensors[0], 1)] if rounding == 'stochastic' else []
            fn([[view] for view, _ in seen] + seeds, c)
            for t, (_, copy) in zip(tensors, seen):
                if copy is not None: t.copy_(copy.view(t.shape))

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        p0, lr = params[0], hypers['lr']
        dtype = coefficient_dtype(p0.dtype)
        rule_c = self.layout.values(self.coefficients(dtype=dtype, **hypers))
        rounding = context.rounding.mode if context.rounding is not None else None
        comps = context.comps if rounding == 'kahan' else None
        for idx, takes_wd in split_by_wd(do_wd, wd):
            decay = wd if takes_wd else 0.
            factors = [1 - lr * decay, 0.] if decouple_wd else [1., decay]
            c = device_tensor([*factors, *rule_c], dtype, p0.device)
            self._call([[params[i], grads[i], *(ss[i] for ss in states), *([comps[i]] if comps else [])] for i in idx],
                       c, rounding)
