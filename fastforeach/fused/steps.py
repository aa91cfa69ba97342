"""Fused steps and the ones done by PyTorch's own multi-tensor kernels."""
from __future__ import annotations

from typing import Callable

import torch

from ..distributed import LOCAL_NORMS, WholeNorms
from ..ops import mul_scalar_

__all__ = ['FusedStep', 'KernelStep', 'EitherStep', 'split_by_wd', 'COMPILED_MIN_NUMEL']

COMPILED_MIN_NUMEL = 1 << 14


class FusedStep:
    """The fused form of a foreach rule: the same state keys and hypers (read off `rule`), done in one pass.

    `run` applies weight decay itself, to the params whose `do_wd` flag is set, and returns what the rule
    would return (a dict of per-param state values, or None). `ready` says whether it can run on these
    tensors with these hypers; when it cannot, the engine runs the foreach rule. A fused step is shared by
    every optimizer that uses it; what an optimizer caches between steps lives in its own `plans`."""
    def __init__(self, rule: Callable):
        self.rule = rule

    def ready(self, p: torch.Tensor, hypers: dict) -> bool: return True

    def run(self, params, grads, states, do_wd, hypers, *, wd: float, decouple_wd: bool, plans: 'Plans',
            norms: WholeNorms = LOCAL_NORMS, sizes: list[int] | None = None):
        """Step. The tensors may be shards of the params (see `distributed.py`): `norms` then completes norms
        of whole params, and `sizes` gives the whole params' numbers of elements, the same on every rank."""
        raise NotImplementedError


def split_by_wd(do_wd: list[bool], wd: float) -> list[tuple[list[int], bool]]:
    "Indices of params that take weight decay and of those that do not (empty lists dropped)."
    if not wd or all(do_wd): return [(list(range(len(do_wd))), bool(wd))]
    takes = [i for i, d in enumerate(do_wd) if d]
    skips = [i for i, d in enumerate(do_wd) if not d]
    return [(idx, flag) for idx, flag in ((takes, True), (skips, False)) if idx]


class KernelStep(FusedStep):
    """A rule done by one of PyTorch's fused multi-tensor kernels: `kernel(params, grads, states, hypers,
    l2=…)` steps one list of params, after decoupled weight decay where the kernel has none."""
    def __init__(self, rule: Callable, kernel: Callable, decoupled_in_kernel: bool = False,
                 ready: Callable | None = None):
        super().__init__(rule)
        self.kernel, self.decoupled_in_kernel, self._ready = kernel, decoupled_in_kernel, ready

    def ready(self, p, hypers): return self._ready is None or self._ready(p, hypers)

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, norms=LOCAL_NORMS, sizes=None):
        for idx, takes_wd in split_by_wd(do_wd, wd):
            (ps, gs, *ss), ops = plans.operands(self, params, grads, states, idx)
            decay = wd if takes_wd else 0.
            if decay and decouple_wd and not self.decoupled_in_kernel: mul_scalar_(ps, 1 - hypers['lr'] * decay)
            self.kernel(ps, gs, ss, hypers, wd=decay, decouple_wd=decouple_wd)
            for o in ops: o.write_back()


class EitherStep(FusedStep):
    """`kernel` where it does the job in one pass, else `compiled`: for SGD, whose kernel has L2 but not
    decoupled weight decay and cannot do momentum 0 with a buffer.

    Decoupled decay with the kernel is a pass of its own over the params; the compiled update saves it,
    but a compiled call costs tens of microseconds, so it is taken only where tensors are large enough for
    the pass to cost more (`COMPILED_MIN_NUMEL` elements on average; measured on xresnet50 and the MLP)."""
    def __init__(self, kernel: KernelStep, compiled: 'CompiledStep'):
        super().__init__(kernel.rule)
        self.kernel, self.compiled = kernel, compiled

    def ready(self, p, hypers): return self.kernel.ready(p, hypers) or self.compiled.ready(p, hypers)

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, norms=LOCAL_NORMS, sizes=None):
        p0, kernel_ready = params[0], self.kernel.ready(params[0], hypers)
        saves_a_pass = wd and decouple_wd and sum(sizes or [p.numel() for p in params]) >= COMPILED_MIN_NUMEL * len(params)
        use = self.kernel
        if (not kernel_ready or saves_a_pass) and self.compiled.ready(p0, hypers): use = self.compiled
        return use.run(params, grads, states, do_wd, hypers, wd=wd, decouple_wd=decouple_wd, plans=plans, norms=norms,
                       sizes=sizes)
