"""Gradient release: a Learner's optimizer steps during the backward pass, and gradients are freed early.

A training step usually holds every gradient until `opt.step()`. With `GradientRelease`, each bucket of
params is stepped as soon as backward has completed their gradients, and their gradients are freed at once
(see `releasing.py`).

fastai's own `opt.step()` is skipped while the callback is on; `zero_grad()` finds no gradient left.
"""
from __future__ import annotations

from fastai.callback.core import Callback, CancelStepException

from ..rules import check_int
from ..core import inner_optimizer
from ..fastai import ForEachOptimizer
from ..releasing import Release

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
    (see the module docstring and `releasing.Release`). `bucket_bytes`: how many bytes of params a bucket
    holds, at least one param. `step_seconds` holds the time the last batch spent stepping (for the benchmark)."""
    order = 90  # before_step: after the callbacks that run there, so that they see the cancel last

    def __init__(self, bucket_bytes: int = 25 << 20):
        self.bucket_bytes, self.release = bucket_bytes, None

    step_seconds = property(lambda self: self.release.step_seconds if self.release else 0.)

    # --- fit ----------------------------------------------------------------------------------------
    def before_fit(self):
        check_releasable(self.learn)
        self.release = Release([p for pg in self.opt.param_lists for p in pg], self.opt.step_params, self.bucket_bytes)
        self.release.attach()

    def after_fit(self): self._remove_hooks()
    def after_cancel_fit(self): self._remove_hooks()

    def _remove_hooks(self):
        if self.release is not None: self.release.detach()

    # --- batch --------------------------------------------------------------------------------------
    def before_backward(self):
        if self.training: self.release.begin()

    def after_backward(self):
        "Step what backward left (params expected to get a gradient and not, or not expected and did); free it."
        if not self.release.active: return
        self.release.end()
        self.opt.finish_step()

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
