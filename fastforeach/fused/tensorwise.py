"""Rules whose state is not shaped like its param (Adafactor's row and column statistics), done by one
compiled update per param (`TensorwiseStep`)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import device_tensor
from ..precision import SEEDED, Rounding
from ..rules import StepRule
from .coefficients import Coefficients
from .compile import PLAIN, _compiled, _compiles, _seeds, coefficient_dtype
from .steps import PLAIN_CONTEXT, FusedStep, split_by_wd

__all__ = ['TensorwiseStep', 'MIN_NUMEL']

# Per device type, the size from which a param takes the compiled update (`takes`): smaller ones take the
# rule's own path (on CPU a compiled call costs more than the foreach ops on small tensors; measured on the
# MLP, xresnet50 and the transformer).
MIN_NUMEL = {'cpu': 1 << 13}
# Params per compiled call. Each is a loop with reductions of its own in the graph: with 8, bf16 Adafactor's
# two graphs took 89 s to compile cold (CPU, 2 threads), with 2, 35 s; the params that take the compiled
# update are the large ones, for which a call more costs little.
CHUNK = 2


def _seen_as(t: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`t` as `shape`: a view where its strides allow, else a copy, also returned second, to be copied back
    into `t` once written (a channels-last kernel seen as a stack of its last two dims)."""
    try: return t.view(shape), None
    except RuntimeError:
        copy = t.reshape(shape).clone()
        return copy, copy


_DUMMIES: dict = {}


class TensorwiseStep(FusedStep):
    """A rule done by its compiled `update(p, g, *state, c)`, `CHUNK` params a call: each param's tensors
    (param, gradient, state, Kahan buffer) seen with their leading dims flattened, so that the param has
    `ndim` dims and one graph serves every param (3 for a factored rule: a stack of matrices, its row and
    column statistics then (stack, rows) and (stack, columns)). `c` is laid out as `layout`:
    the decay factors (the decoupled factor 1 − lr·wd, or 1; the L2 factor wd, or 0), then what
    `coefficients(dtype=..., **hypers)` gives by name, `dtype` being the one the update computes in.

    Its state may have any shape (`param_shaped` False): reductions over a param's rows or columns in one
    graph. It takes params of `MIN_NUMEL` elements or more; the engine steps the others on the rule's own
    path, and all of them where the update does not compile. The update does the weight decay itself,
    where its rule wants it (Adafactor: after it has read the param's RMS). 16-bit params stepped in
    float32 are written back in the same call (see `_runner`)."""
    param_shaped = False

    def __init__(self, rule: Callable, update: Callable, coefficients: Callable, layout: Coefficients, ndim: int):
        super().__init__(rule)
        self.update, self.coefficients, self.layout, self.ndim = update, coefficients, layout, ndim

    def takes(self, p) -> bool: return p.numel() >= MIN_NUMEL.get(p.device.type, 0)

    def ready(self, p, hypers, rounding: Rounding | None = None) -> bool:
        "Whether the update compiled for params like `p` (written back as `rounding` says), on dummies: compiled once."
        rule, mode = self._rule, rounding.mode if rounding is not None else None
        states = tuple(rule.state[k].dtype_for(p) for k in rule.state_keys)
        comps = (rounding.comp_dtype,) if rounding is not None and rounding.kahan else ()

        def attempt():
            # Sizes as large as real weights': inductor plans its loops (threads, vector width) from the first.
            like = torch.ones((8,) * (self.ndim - 1) + (1 << 16 >> 3 * (self.ndim - 1),), dtype=p.dtype, device=p.device)
            tensors = [like, torch.ones_like(like), *(rule.state[k].zeros(like, dtype) for k, dtype in zip(rule.state_keys, states)),
                       *(torch.zeros_like(like, dtype=dtype) for dtype in comps)]
            self._call([tensors] * CHUNK, torch.zeros(len(self.layout), dtype=coefficient_dtype(p.dtype), device=p.device), mode)
        return _compiles((self.update, p.dtype, states, comps, p.device.type, mode), [self.update], p, attempt)

    def _shapes(self, p) -> list[tuple]:
        """How the update sees each of `p`'s tensors (param, gradient, state, Kahan buffer): leading dims
        flattened into one, so that the param has `ndim` dims, and a statistic's reduced dims dropped (the
        update puts them back, of a size 1 it knows: traced sizes are not assumed to broadcast)."""
        whole = (-1, *p.shape[p.ndim - self.ndim + 1:]) if self.ndim > 1 else (-1,)
        def kept(spec): return tuple(n for d, n in enumerate(whole) if d - self.ndim not in spec.reduces)
        return [whole, whole, *(kept(self._rule.state[k]) for k in self._rule.state_keys), whole]

    def _call(self, per_param: list[list[torch.Tensor]], c: torch.Tensor, rounding: str | None) -> None:
        """The compiled update on each param's tensors (param, gradient, state, then its buffer with
        'kahan' or 'master24'), `CHUNK` params a call, the last call's padded with one-element dummies (one graph)."""
        like = per_param[0][0]
        fn = _compiled(self.update, PLAIN, like.dtype, like.device.type, rounding)
        dummies = self._dummies(tuple(t.dtype for t in per_param[0]), like.device)
        for at in range(0, len(per_param), CHUNK):
            seen = [[_seen_as(t, shape) for t, shape in zip(tensors, self._shapes(tensors[0]))]
                    for tensors in per_param[at:at + CHUNK]]
            lists = [[view for view, _ in views] + pad[len(seen):] for views, pad in zip(zip(*seen), dummies)]
            fn(lists + ([_seeds(like, CHUNK)] if rounding in SEEDED else []), c)
            for tensors, views in zip(per_param[at:at + CHUNK], seen):
                for t, (_, copy) in zip(tensors, views):
                    if copy is not None: t.copy_(copy.view(t.shape))

    def _dummies(self, dtypes: tuple, device) -> list[list[torch.Tensor]]:
        """`CHUNK` distinct one-element tensors per list, seen as the update sees it, of its dtype (padding:
        written, never read), made once."""
        key = (self.update, dtypes, device)
        if key not in _DUMMIES:
            one = torch.zeros((1,) * self.ndim, device='meta')
            _DUMMIES[key] = [[torch.zeros([1] * len(shape), dtype=dtype, device=device) for _ in range(CHUNK)]
                             for dtype, shape in zip(dtypes, self._shapes(one))]
        return _DUMMIES[key]

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        p0, lr = params[0], hypers['lr']
        dtype = coefficient_dtype(p0.dtype)
        rule_c = self.layout.values(self.coefficients(dtype=dtype, **hypers))
        rounding = context.rounding.mode if context.rounding is not None else None
        comps = context.comps if context.rounding is not None and context.rounding.kahan else None
        for idx, takes_wd in split_by_wd(do_wd, wd):
            decay = wd if takes_wd else 0.
            factors = [1 - lr * decay, 0.] if decouple_wd else [1., decay]
            c = device_tensor([*factors, *rule_c], dtype, p0.device)
            self._call([[params[i], grads[i], *(ss[i] for ss in states), *([comps[i]] if comps else [])] for i in idx],
                       c, rounding)
