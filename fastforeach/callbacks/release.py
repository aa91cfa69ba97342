"""Gradient release: a Learner's optimizer steps during the backward pass, and gradients are freed early.

A training step usually holds every gradient until `opt.step()`. With `GradientRelease`, each bucket of
params (consecutive params in backward order, about `bucket_bytes` of them) is stepped as soon as backward
has completed their gradients, in a hook (`register_post_accumulate_grad_hook`), and their gradients are
freed at once: at most a bucket's gradients, plus the layer backward is computing, are alive at a time.
Each bucket is one foreach or fused step of the optimizer, and the params end where a normal step would
have taken them.

fastai's own `opt.step()` is skipped while the callback is on; `zero_grad()` finds no gradient left.
"""
from __future__ import annotations

import time

from fastai.callback.core import Callback, CancelStepException

from ..rules import check_int
from ..core import inner_optimizer
from ..fastai import ForEachOptimizer

__all__ = ['GradientRelease', 'OptimizerAccumulation']


def check_releasable(learn) -> None:
    "Raise `ValueError` for what gradient release cannot do with `learn`, before anything has changed."
    from fastai.callback.fp16 import AMPMode, MixedPrecision
    from fastai.callback.training import GradientAccumulation, GradientClip

    opt = learn.opt
    if not isinstance(inner_optimizer(opt), ForEachOptimizer):
        raise ValueError(f"GradientRelease needs a fastforeach optimizer, not {type(inner_optimizer(opt)).__name__}: it steps "
                         "buckets of params during backward (opt_func=fastforeach.Adam, ...)")
    for cb in learn.cbs:
        if isinstance(cb, GradientAccumulation):
            raise ValueError("GradientRelease cannot run with GradientAccumulation: gradients are freed as soon as "
                             "they are stepped (see fastforeach's optimizer accumulation instead)")
        if isinstance(cb, GradientClip):
            raise ValueError("GradientRelease cannot run with GradientClip: clipping by the norm of all gradients "
                             "needs them all at once, and each bucket is stepped before the next is computed")
        if isinstance(cb, MixedPrecision) and cb.amp_mode == AMPMode.FP16:
            raise ValueError("GradientRelease cannot run with float16 mixed precision (to_fp16): its GradScaler "
                             "unscales and checks every gradient before the step; use to_bf16() or to_pure_bf16()")


class GradientRelease(Callback):
    """Step each bucket of params during backward, as soon as its gradients are complete, and free them
    (see the module docstring). `bucket_bytes`: how many bytes of params a bucket holds, at least one
    param. `step_seconds` holds the time the last batch spent stepping (for the benchmark)."""
    order = 90  # before_step: after the callbacks that run there, so that they see the cancel last

    def __init__(self, bucket_bytes: int = 25 << 20):
        self.bucket_bytes = bucket_bytes
        self.hooks, self.active = [], False
        self.silent = set()   # ids of params that expected a gradient and got none in the last batch
        self._plan = None

    # --- fit ----------------------------------------------------------------------------------------
    def before_fit(self):
        check_releasable(self.learn)
        self.params = [p for pg in self.opt.param_lists for p in pg][::-1]  # about the order backward completes them
        # Params frozen for this fit (requires_grad off) get no gradient and take no hook.
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params if p.requires_grad]

    def after_fit(self): self._remove_hooks()
    def after_cancel_fit(self): self._remove_hooks()

    def _remove_hooks(self):
        for h in self.hooks: h.remove()
        self.hooks, self.active = [], False

    # --- batch --------------------------------------------------------------------------------------
    def before_backward(self):
        if not self.training: return
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
        self.opt.step_params(params)
        self.step_seconds += time.perf_counter() - start
        for p in params: p.grad = None

    def after_backward(self):
        "Step what backward left (params expected to get a gradient and not, or not expected and did); free it."
        if not self.active: return
        self.active = False
        left = [p for p in self.params if p.grad is not None]
        if left: self._step(left)
        self.opt.finish_step()
        expected = {id(p) for b in self.buckets for p in b}
        self.silent = (self.silent | (expected - self.fired)) - self.fired

    def before_step(self): raise CancelStepException


class OptimizerAccumulation(Callback):
    """Optimizer accumulation (see `accumulation.py`): `n_acc` micro-batches' gradients folded into the
    optimizer's averages, the params moved on every `n_acc`-th. With `GradientRelease`, each bucket's
    gradients are folded and freed during backward. The effective batch is `n_acc` batches, as with
    fastai's `GradientAccumulation(n_acc * bs)`; unlike it, the loss is not scaled."""
    order = 89  # before GradientRelease's before_step
    run_valid = False

    def __init__(self, n_acc: int = 4):
        check_int('n_acc', n_acc, 1)
        self.n_acc = n_acc

    def before_fit(self):
        from fastai.callback.training import GradientAccumulation

        inner = inner_optimizer(self.opt)
        if not isinstance(inner, ForEachOptimizer):
            raise ValueError(f"OptimizerAccumulation needs a fastforeach optimizer, not {type(inner).__name__}")
        for cb in self.learn.cbs:
            if isinstance(cb, GradientAccumulation):
                raise ValueError("OptimizerAccumulation and GradientAccumulation accumulate the same micro-batches "
                                 "twice: use one")
        inner.check_accumulation()
        self.count = 0

    def before_backward(self):
        inner_optimizer(self.opt).accumulation = (self.count % self.n_acc, self.n_acc)

    def after_step(self): self.count += 1  # after the step, or its cancel by GradientRelease
    def after_fit(self): inner_optimizer(self.opt).accumulation = None
