"""What a fused step keeps between steps: operands and packs, reused while the same tensors come back."""
from __future__ import annotations

import itertools
import operator
from typing import Callable

import torch

from .layout import Operands, _identity
from .packs import Pack

__all__ = ['Plans']

class Plans:
    """The operands of each call site's last step, reused while the same tensors come back with the same
    storage (fastai keeps its gradient tensors between steps; the state is ours).

    Building them costs a few microseconds per tensor, which on a model of many small tensors is more
    than the fused arithmetic."""
    def __init__(self):
        self._plans = {}

    def __getstate__(self):
        "A copy (pickle, deepcopy) starts with no plans: the cached operands alias the original's tensors."
        return {'_plans': {}}

    def buffers(self) -> list:
        "What the cached plans hold: packs, and operands (flat aliases of params and state, or copies of them)."
        return [plan[2] for plan in self._plans.values()]

    def get(self, key, tensors: list, build: Callable):
        "`(operands, ops)`: the cached operands and no ops, or `build()`'s, cached when no op needs copying back."
        ptrs = list(map(torch.Tensor.data_ptr, tensors))
        plan = self._plans.get(key)
        if plan is not None and plan[1] == ptrs and all(map(operator.is_, plan[0], tensors)):
            return plan[2], ()
        operands, ops = build()
        if any(o.back for o in ops): self._plans.pop(key, None)
        else: self._plans[key] = (tensors, ptrs, operands)
        return operands, ops

    def operands(self, owner, params, grads, states, idx, alias=_identity):
        """`Operands.of(params, grads, states, idx, alias)` for `owner`, from the last step's when they still hold.

        The plan holds params and state, not gradients, which may be new tensors at every step (a gradient
        release frees them, and a plan must not keep them alive): gradients laid out as their params are
        used as they are (checked unless they are the last step's, by id and data pointer)."""
        lists = (params, grads, *states)
        if len(idx) < len(params): lists = [[xs[i] for i in idx] for xs in lists]  # else idx is every index
        ps, gs = lists[0], lists[1]
        held = [*ps, *itertools.chain.from_iterable(lists[2:])]
        key, ptrs = (owner, id(params[idx[0]])), list(map(torch.Tensor.data_ptr, held))
        grad_ids = (list(map(id, gs)), list(map(torch.Tensor.data_ptr, gs)))
        plan = self._plans.get(key)
        if plan is not None and plan[1] == ptrs and all(map(operator.is_, plan[0], held)):
            cached, seen = plan[2], plan[3]
            if seen == grad_ids or all(g.stride() == p.stride() and g.dtype == p.dtype for p, g in zip(ps, gs)):
                plan[3] = grad_ids
                return [cached[0], [alias(g) for g in gs] if alias is not _identity else gs, *cached[2:]], ()
        operands, ops = Operands.of(params, grads, states, idx, alias)
        if any(o.back for o in ops): self._plans.pop(key, None)
        else: self._plans[key] = [held, ptrs, [operands[0], None, *operands[2:]], grad_ids]
        return operands, ops

    def pack(self, owner, params, states, idx, comps=None, adopt: bool = True) -> Pack:
        """The `Pack` of the params at `idx` for `owner`, the last step's while the same params and state come
        back. `idx` should be sorted by size, so that params of one size lie together (see `Pack.norms`).
        `comps`: Kahan buffers, for 16-bit params stepped in float32; `adopt`: see `Pack`."""
        sub = [[xs[i] for i in idx] for xs in (params, *states, *([comps] if comps else []))]
        tensors = [t for xs in sub for t in xs]
        key = (owner, 'pack', id(params[idx[0]]), comps is not None)
        n_states = len(states)

        def build():
            # A pack of other params that shares any of these (a group frozen, then not) would hold the
            # buffers they move out of: dropped.
            ids = {id(p) for p in sub[0]}
            for k in [k for k, plan in self._plans.items()
                      if k[:2] == (owner, 'pack') and k != key and any(id(p) in ids for p in plan[2].params)]:
                del self._plans[k]
            return Pack(sub[0], sub[1:1 + n_states], sub[1 + n_states] if comps else None, adopt), ()
        pack = self.get(key, tensors, build)[0]
        # Moved state is stored by the caller; the next step finds it in place and caches a pack over it.
        if any(v is not None for v in pack.moved): self._plans.pop(key, None)
        return pack
