"""What a training setup holds in memory, per parameter element, counted from the tensors themselves.

`memory_report(params, opt)` walks the params, their gradients, the optimizer's state (its state dict:
averages, Kahan buffers, Lookahead's slow weights, torch.optim's step counts) and fastforeach's own
buffers (packs, cached operands), and counts each storage once, in the
first of these it is found in: a pack's state buffers are the state, a flat alias of a param is the
param. DTensors count this rank's shard.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from fastcore.foundation import L

from .core import inner_optimizer
from .distributed import is_sharded, local

__all__ = ['memory_report', 'own_buffers', 'state_bytes', 'PeakGradBytes']

KINDS = ('params', 'grads', 'state', 'fastforeach')


def _tensors(obj) -> Iterator[torch.Tensor]:
    "Every tensor in `obj`: nested dicts, lists and tuples, what objects say they hold (`buffers()`), what wrapper subclasses wrap."
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            # A wrapper subclass (torchao's low-bit state) has no storage of its own: the tensors it wraps do.
            if hasattr(x, '__tensor_flatten__') and not is_sharded(x): stack += [getattr(x, k) for k in x.__tensor_flatten__()[0]]
            else: yield x
        elif isinstance(x, dict): stack += x.values()
        elif isinstance(x, (list, tuple, L)): stack += list(x)
        elif hasattr(x, 'buffers') and not isinstance(x, torch.nn.Module): stack += list(x.buffers())


def own_buffers(opt) -> list[torch.Tensor]:
    """fastforeach's own tensors behind `opt`: its fused steps' and Lookahead's plans and packs. (The
    padding of compiled calls, one-element tensors shared by the whole process, is left out.)"""
    plans = [getattr(o, name) for o in dict.fromkeys((opt, inner_optimizer(opt)))  # Lookahead's, and its inner one's
             for name in ('fused_plans', '_plans') if hasattr(o, name)]
    return list(_tensors([p.buffers() for p in plans]))


def _state_of(opt) -> Iterable:
    sd = opt.state_dict()
    return sd if 'hypers' in sd else sd.get('state', {})  # fastai's own format, or torch.optim's


def memory_report(params: Iterable[torch.Tensor], opt=None) -> dict:
    """Bytes held by the params, their gradients, `opt`'s state and fastforeach's buffers, each storage
    counted once (see the module docstring); `per_param` gives the same divided by the number of param
    elements, and `total` their sum."""
    params = [p for p in params]
    found = {
        'params': params,
        'grads': [p.grad for p in params if p.grad is not None],
        'state': list(_tensors(_state_of(opt))) if opt is not None else [],
        'fastforeach': own_buffers(opt) if opt is not None else [],
    }
    seen = set()
    report = {kind: _storage_bytes(found[kind], seen) for kind in KINDS}
    report['total'] = sum(report[k] for k in KINDS)
    n = sum(local(p).numel() for p in params)
    report['per_param'] = {k: report[k] / n for k in (*KINDS, 'total')}
    return report


def _storage_bytes(tensors, seen: set) -> int:
    "Bytes of the storages of `tensors` (this rank's shards of DTensors) not in `seen`, which they join: each counted once."
    total = 0
    for t in tensors:
        storage = local(t).untyped_storage()
        key = (storage.data_ptr(), storage.device)
        if key in seen or storage.nbytes() == 0: continue
        seen.add(key)
        total += storage.nbytes()
    return total


def state_bytes(opt) -> int:
    "Bytes of the tensors in `opt`'s state dict, each storage once: what the optimizer holds beyond params and gradients."
    return _storage_bytes(_tensors(opt.state_dict()), set())


class PeakGradBytes:
    """The most bytes of gradients of `params` alive at once during backward passes, as the hooks that backward
    calls once a param's gradient is complete see them; `remove()` the hooks when done. Make it before a
    gradient release (`release.GradientRelease`) so that each hook looks before a bucket's are freed."""
    def __init__(self, params):
        self.params, self.peak = list(params), 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._seen) for p in self.params if p.requires_grad]

    def _seen(self, _):
        self.peak = max(self.peak, sum(p.grad.nbytes for p in self.params if p.grad is not None))

    def remove(self):
        for h in self.hooks: h.remove()
