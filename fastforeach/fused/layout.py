"""Tensors as fused steps see them: dense, flat, laid end to end; and the operands a step caches."""
from __future__ import annotations

import itertools
import operator
from typing import Callable

import torch

__all__ = ['is_dense', 'flat_alias', 'Operands', 'end_to_end', 'alias_from', 'laid_end_to_end']

def is_dense(t: torch.Tensor) -> bool:
    "Whether `t`'s elements fill one block of storage, in some order of its dims (contiguous, channels last…)."
    if t.is_contiguous(): return True
    expected = 1
    for d in sorted(range(t.ndim), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected: return False
        expected *= t.size(d)
    return True


def flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor over the storage of dense `t`, made with `set_` rather than `view`: dynamo guards on a
    view's base, whose shape differs from param to param, and would recompile for each."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _identity(t): return t


class Operands:
    """A param, its gradient and its state, laid out element for element alike, as fused kernels need them
    (PyTorch's walk memory in order) and as flat aliases of them presume.

    A param that is not dense, or a gradient or state tensor whose strides differ from the param's, is
    copied into a dense tensor laid out like the param; copies of the param and state are written back
    after the step (`write_back`). `alias` maps each tensor handed out (identity, or `flat_alias`)."""
    __slots__ = ('p', 'g', 'states', 'back', 'alias')

    def __init__(self, p, g, states, alias: Callable = _identity):
        self.back, self.alias = [], alias
        dense = is_dense(p)
        self.p = alias(p) if dense else self._copy(p, None, back=True)
        like = p if dense else None
        self.g = alias(g) if dense and g.stride() == p.stride() else self._copy(g, like, back=False)
        self.states = [alias(s) if dense and s.stride() == p.stride() else self._copy(s, like, back=True)
                       for s in states]

    def _copy(self, t, like, back):
        work = torch.empty_like(like) if like is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        work.copy_(t)
        if back: self.back.append((t, work))
        return self.alias(work)

    def write_back(self):
        for t, work in self.back: t.copy_(work)

    @classmethod
    def of(cls, params, grads, states, idx, alias=_identity):
        "`(lists, ops)`: the (params, grads, *states) lists of the params at `idx`, and their operands."
        ops = [cls(params[i], grads[i], [s[i] for s in states], alias) for i in idx]
        return [[o.p for o in ops], [o.g for o in ops], *([o.states[k] for o in ops] for k in range(len(states)))], ops


def end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-d alias over `tensors` when each is contiguous and each starts where the one before ends, in one
    storage (as views of one buffer do); else None. Empty tensors hold nothing and may lie anywhere.
    Each property is read by one `map` over the tensors: this runs at every step of a pack, on its gradients."""
    numels = list(map(torch.Tensor.numel, tensors))
    held = list(itertools.compress(tensors, numels))
    if not held: return torch.empty(0, dtype=tensors[0].dtype, device=tensors[0].device)
    first, size = held[0], held[0].element_size()
    starts = list(map(torch.Tensor.data_ptr, held))
    ends = [start + n * size for start, n in zip(starts, filter(None, numels))]
    if (starts[1:] != ends[:-1] or not all(map(torch.Tensor.is_contiguous, held))
            or len(set(map(_dtype, held))) > 1):
        return None
    # Views of one tensor share its storage (and device); others are checked one by one, as separate
    # allocations may lie side by side.
    storage, base = first.untyped_storage(), first._base
    if base is None or not all(t._base is base for t in held):
        if any(t.device != first.device or t.untyped_storage().data_ptr() != storage.data_ptr() for t in held):
            return None
    return alias_from(first, (ends[-1] - starts[0]) // size)


def alias_from(first: torch.Tensor, numel: int) -> torch.Tensor:
    "A 1-d alias of `numel` elements of `first`'s storage, from where `first` starts."
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(first.untyped_storage(), first.storage_offset(),
                                                                      (numel,), (1,))


_dtype = operator.attrgetter('dtype')


def laid_end_to_end(like: list[torch.Tensor], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    "A new buffer (in `dtype`, else `like`'s), and views of it shaped like each of `like` (contiguous), one after the other."
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype or like[0].dtype, device=like[0].device)
    return flat, [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like)]
