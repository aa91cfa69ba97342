"""Gradient release without fastai: an optimizer's params stepped during the backward pass, bucket by bucket,
their gradients freed at once (the fastai callback `callbacks.GradientRelease` and the torch face's
`optim.GradientRelease` both use `Release`).

Each bucket (consecutive params in backward order, about `bucket_bytes` of them) is stepped as soon as
backward has completed their gradients, in a hook (`register_post_accumulate_grad_hook`), and its
gradients are freed: at most a bucket's gradients, plus the layer backward is computing, are alive at a
time. Each bucket is one foreach or fused step, and the params end where a normal step would take them.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ['Release']


class Release:
    """Buckets of `params` stepped by `step(params)` during backward (see the module docstring): `attach()`
    the hooks once, `begin()` before each backward and `end()` after it, which steps what backward left (params
    expected to get a gradient that did not, or not expected that did) and frees it; `detach()` when done.
    `step_seconds` holds the time the last backward spent stepping."""
    def __init__(self, params, step: Callable, bucket_bytes: int = 25 << 20):
        self.params = list(params)[::-1]  # about the order backward completes them
        self.step, self.bucket_bytes = step, bucket_bytes
        self.hooks, self.active, self.step_seconds = [], False, 0.
        self.silent = set()   # ids of params that expected a gradient and got none in the last backward
        self._plan = None

    def attach(self):
        "Hook every param that takes a gradient now (params frozen with requires_grad off take none)."
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params if p.requires_grad]

    def detach(self):
        for h in self.hooks: h.remove()
        self.hooks, self.active = [], False

    def begin(self):
        expected = [p for p in self.params if p.requires_grad and id(p) not in self.silent]
        key = tuple(map(id, expected))
        if self._plan is None or self._plan[0] != key: self._plan = (key, *self._buckets(expected))
        _, self.bucket_of, buckets = self._plan
        self.pending = [len(b) for b in buckets]
        self.buckets, self.fired, self.active, self.step_seconds = buckets, set(), True, 0.

    def _buckets(self, expected):
        "Consecutive params of about `bucket_bytes` each; and each param's bucket."
        buckets, size = [[]], 0
        for p in expected:
            if buckets[-1] and size + p.nbytes > self.bucket_bytes: buckets.append([]); size = 0
            buckets[-1].append(p)
            size += p.nbytes
        return {id(p): i for i, b in enumerate(buckets) for p in b}, [b for b in buckets if b]

    def _on_grad(self, p):
        if not self.active: return
        self.fired.add(id(p))
        i = self.bucket_of.get(id(p))
        if i is None: return  # not expected: stepped after backward, with what is left
        self.pending[i] -= 1
        if self.pending[i] == 0: self._step(self.buckets[i])

    def _step(self, params):
        start = time.perf_counter()
        self.step(params)
        self.step_seconds += time.perf_counter() - start
        for p in params: p.grad = None

    def end(self):
        "After backward: step what it left, free it; remember which params went without a gradient."
        if not self.active: return
        self.active = False
        left = [p for p in self.params if p.grad is not None]
        if left: self._step(left)
        expected = {id(p) for b in self.buckets for p in b}
        self.silent = (self.silent | (expected - self.fired)) - self.fired
