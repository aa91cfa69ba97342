"""Fused steps and the ones done by PyTorch's own multi-tensor kernels."""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ..distributed import LOCAL_NORMS, WholeNorms
from ..ops import mul_scalar_
from ..precision import Rounding
from ..rules import StepRule

__all__ = ['FusedStep', 'KernelStep', 'EitherStep', 'Context', 'split_by_wd', 'fused_form', 'foreach_for_16bit', 'COMPILED_MIN_NUMEL',
           'COMPILED_OVER_KERNEL', 'FUSED_16BIT']

# Per device type, the average size of tensor from which `EitherStep` takes its compiled update over a kernel
# plus a pass of decoupled weight decay (see there); device types not listed keep the kernel.
COMPILED_MIN_NUMEL = {'cpu': 1 << 14}
# Device types where `EitherStep` takes its compiled update over the kernel whenever it compiles: where a
# settled pack's step is replayed from a graph (see `graphs.py`), one launch against the kernel's host work.
COMPILED_OVER_KERNEL: set[str] = set()
# Device types on which an optimizer built without its fused step steps 16-bit params (in float32 working
# values, see `precision.py`) by its rule's fused form where there is one and it compiles (`fused_form`): the
# foreach form copies each chunk to float32 and back and rounds its state with eager integer ops (Adam in
# bf16 on CPU xresnet50: 317 ms a step foreach, 43 ms fused, float32 foreach 40 ms).
FUSED_16BIT: set[str] = {'cpu', 'cuda'}
_FUSED_FORMS: dict[Callable, 'FusedStep'] = {}


@contextmanager
def foreach_for_16bit():
    "Within it, 16-bit params are stepped by the foreach rule of an optimizer built without `fused=True` (see `FUSED_16BIT`)."
    saved = set(FUSED_16BIT)
    FUSED_16BIT.clear()
    try: yield
    finally: FUSED_16BIT.update(saved)


def fused_form(rule: Callable) -> 'FusedStep | None':
    "The fused step made last for the foreach rule `rule` (a function: an `EitherStep` after its parts), or None."
    return _FUSED_FORMS.get(rule)


@dataclass(frozen=True)
class Context:
    """What a fused step knows of its bucket beyond its tensors.

    The tensors may be shards of the params (see `distributed.py`): `norms` then completes norms of whole
    params, and `sizes` gives the whole params' numbers of elements, the same on every rank. For 16-bit
    params stepped in float32 (see `precision.py`), `rounding` says how they are written back and `comps`
    holds their Kahan buffers (with Kahan summation)."""
    norms: WholeNorms = LOCAL_NORMS
    sizes: list | None = None
    rounding: Rounding | None = None
    comps: list | None = None


PLAIN_CONTEXT = Context()


class FusedStep:
    """The fused form of a foreach rule: the same state keys and hypers (read off `rule`), done in one pass.

    `run` applies weight decay itself, to the params whose `do_wd` flag is set, and returns what the rule
    would return (a dict of per-param state values, or None). `ready` says whether it can run on these
    tensors with these hypers (and `rounding`, for 16-bit params stepped in float32); when it cannot, the
    engine runs the foreach rule. A fused step is shared by every optimizer that uses it; what an
    optimizer caches between steps lives in its own `plans`. `param_shaped`: it walks each param's state
    element for element with it (every fused step but `TensorwiseStep`), so takes only such state."""
    param_shaped = True

    def __init__(self, rule: Callable):
        declared = StepRule.of(rule)
        if self.param_shaped and not declared.like_params:
            odd = [k for k, spec in declared.state.items() if not spec.like_param]
            raise TypeError(f"{declared.name} has no fused form: its state {odd} is not shaped like its param, and "
                            "fused steps walk each param's state element for element with it")
        self.rule = rule
        # Rules that are functions (not partials made per optimizer) know their fused form: see `FUSED_16BIT`.
        if inspect.isfunction(rule): _FUSED_FORMS[rule] = self

    @cached_property
    def _rule(self) -> StepRule: return StepRule.of(self.rule)

    # `takes(p)`: whether it steps `p`, where not every param (the engine steps the others on the rule's own path).
    takes: Callable | None = None

    def ready(self, p: torch.Tensor, hypers: dict, rounding: Rounding | None = None) -> bool: return rounding is None

    def run(self, params, grads, states, do_wd, hypers, *, wd: float, decouple_wd: bool, plans: 'Plans',
            context: Context = PLAIN_CONTEXT):
        "Step the bucket (see `Context`)."
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

    def ready(self, p, hypers, rounding=None):
        "PyTorch's kernels round each param to nearest: not for 16-bit params stepped in float32."
        return rounding is None and (self._ready is None or self._ready(p, hypers))

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        for idx, takes_wd in split_by_wd(do_wd, wd):
            (ps, gs, *ss), ops = plans.operands(self, params, grads, states, idx)
            decay = wd if takes_wd else 0.
            if decay and decouple_wd and not self.decoupled_in_kernel: mul_scalar_(ps, 1 - hypers['lr'] * decay)
            self.kernel(ps, gs, ss, hypers, wd=decay, decouple_wd=decouple_wd)
            for o in ops: o.write_back()


class EitherStep(FusedStep):
    """`kernel` where it does the job in one pass, else `compiled`: for SGD, whose kernel has L2 but not
    decoupled weight decay and cannot do momentum 0 with a buffer; for 16-bit params stepped in float32,
    which no kernel does (Adam and SGD).

    Decoupled decay with a kernel that lacks it is a pass of its own over the params; the compiled update
    saves it, but a compiled call costs tens of microseconds, so it is taken only where tensors are large
    enough for the pass to cost more (`COMPILED_MIN_NUMEL` elements on average; measured on xresnet50 and
    the MLP on CPU). On CUDA the pass is one multi-tensor launch and the compiled call costs the host more
    (H200, xresnet50, SGD with momentum and decoupled decay under Lookahead: 1.72 ms a step compiled, the
    kernel's SGD 0.55 ms without the pass): the kernel is kept there."""
    def __init__(self, kernel: KernelStep, compiled: 'CompiledStep'):
        super().__init__(kernel.rule)
        self.kernel, self.compiled = kernel, compiled

    def ready(self, p, hypers, rounding=None):
        return self.kernel.ready(p, hypers, rounding) or self.compiled.ready(p, hypers, rounding)

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        p0, rounding = params[0], context.rounding
        kernel_ready = self.kernel.ready(p0, hypers, rounding)
        saves_a_pass = (wd and decouple_wd and not self.kernel.decoupled_in_kernel and
                        sum(context.sizes or [p.numel() for p in params]) >=
                        COMPILED_MIN_NUMEL.get(p0.device.type, math.inf) * len(params))
        use = self.kernel
        if ((not kernel_ready or saves_a_pass or p0.device.type in COMPILED_OVER_KERNEL) and
                self.compiled.ready(p0, hypers, rounding)): use = self.compiled
        return use.run(params, grads, states, do_wd, hypers, wd=wd, decouple_wd=decouple_wd, plans=plans,
                       context=context)
