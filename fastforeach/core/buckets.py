"""Buckets: the params of one group that one call of a rule steps together, with their gradients and state."""
from __future__ import annotations

import torch

from ..distributed import LOCAL_NORMS, check_layout, is_sharded, layout, local, norms_for
from ..rules import StepRule

__all__ = ['Bucket', 'buckets']


class Bucket:
    """Params of one group that share device, dtype, layout and step count, with what the rule needs of them.

    `params` and `grads` are what the rule steps: for params sharded as DTensors, this rank's local shards,
    with the DTensors themselves in `origins` (their state is created like them) and the `WholeNorms` that
    completes their norms in `norms`. For plain params `origins` is `params`."""
    __slots__ = ('params', 'grads', 'states', 'origins', 'norms')

    def __init__(self, params=None, grads=None, states=None, origins=None, norms=LOCAL_NORMS):
        self.params, self.grads, self.states = params or [], grads or [], states or []
        self.origins = self.params if origins is None else origins
        self.norms = norms

    @property
    def sharded(self) -> bool: return self.origins is not self.params

    def chunks(self, max_bytes: int | None):
        "Split into runs of params whose total size stays under `max_bytes` (a param alone may exceed it); None: whole."
        if max_bytes is None:
            yield self
            return
        start, size = 0, 0
        for i, p in enumerate(self.params):
            b = p.nbytes
            if i > start and size + b > max_bytes:
                yield self._slice(start, i); start, size = i, 0
            size += b
        if start < len(self.params): yield self._slice(start, len(self.params))

    def _slice(self, i, j): return self._like(*(xs[i:j] for xs in self._lists))

    def pick(self, idx) -> 'Bucket':
        "The params at `idx`, with their gradients and state."
        return self._like(*([xs[i] for i in idx] for xs in self._lists))

    @property
    def _lists(self): return (self.params, self.grads, self.states) + ((self.origins,) if self.sharded else ())

    def _like(self, params, grads, states, origins=None):
        return Bucket(params, grads, states, origins, self.norms)

    def shards(self) -> 'Bucket':
        "This bucket of DTensors as their local shards, after checking each can be stepped so."
        for p, g in zip(self.params, self.grads): check_layout(p, g, f"of shape {tuple(p.shape)}")
        return Bucket([local(p) for p in self.params], [local(g) for g in self.grads], self.states, self.params,
                      norms_for(self.params[0]))


def buckets(params, grads, states, rule: StepRule, sharded: bool) -> list[Bucket]:
    """One group's params split by device, dtype, layout (`sharded`: DTensors become their local shards here,
    once) and, for rules that count steps, step count and running scalars; in order."""
    group = Bucket(params, grads, states)
    by_device = torch._C._group_tensors_by_device_and_dtype([params], True)  # in C++: 0.1 µs a param
    runs = [group] if len(by_device) == 1 else [
        group.pick(idx) for _, idx in sorted((idx[0], idx) for _, idx in by_device.values())]
    if sharded: runs = [b for run in runs for b in _by_layout(run)]
    if not rule.counts_steps: return runs
    out, keys = [], ('step', *(rule.scalars.initial if rule.scalars else ()))
    for run in runs:
        if len(keys) == 1: steps = [state.get('step', 0) for state in run.states]
        else: steps = [tuple(state.get(k, 0) for k in keys) for state in run.states]
        if steps.count(steps[0]) == len(steps): out.append(run); continue
        by_step = {}
        for i, step in enumerate(steps): by_step.setdefault(step, []).append(i)
        out += [run.pick(idx) for idx in by_step.values()]
    return out


def _by_layout(run: Bucket) -> list[Bucket]:
    "`run` split by layout (plain, or a DTensor's mesh and placements), DTensors as their local shards."
    by_layout = {}
    for i, p in enumerate(run.params): by_layout.setdefault(layout(p), []).append(i)
    subs = [run] if len(by_layout) == 1 else [run.pick(idx) for idx in by_layout.values()]
    return [sub.shards() if is_sharded(sub.params[0]) else sub for sub in subs]
