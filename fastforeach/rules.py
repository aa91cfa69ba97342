"""What the engine reads off a step rule: its state keys and hypers, from its signature.

A step rule is a function over lists whose signature is its state spec::

    def adam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps): ...

- positional `p, g`: the params and their gradients;
- further positional names: per-param state tensors under fastai's own keys, created as zeros on the
  first step;
- keyword-only names: hypers read from the param group at every step, plus `step` (fastai's per-param
  step count, already incremented) and `norms` (a `distributed.WholeNorms`: `norms(*lists)` gives the L2
  norm of each whole param, also when the rule sees only this rank's shards) when the rule asks for them.

A rule may return a dict of per-param values to store in the state (Larc's `local_lr`). A rule may also
keep per-param running scalars besides `step` (`Scalars`, ScheduleFreeAdam's): the engine advances them
before each step, stores them in the state, and passes them as keywords.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

__all__ = ['StepRule', 'Scalars', 'keeps_scalars']


@dataclass(frozen=True)
class Scalars:
    """Per-param running scalars of a rule: their `initial` values, and `advance(**current, **kwargs)`, their
    values for this step from the last ones and the step's keywords (`step` and the hypers)."""
    initial: dict
    advance: Callable


def keeps_scalars(rule: Callable, initial: dict, advance: Callable) -> Callable:
    "Mark `rule` as keeping the per-param running scalars `initial` (see `Scalars`)."
    rule.scalars = Scalars(initial, advance)
    return rule


@dataclass(frozen=True)
class StepRule:
    "What the engine reads off a step rule's signature: state keys and hypers."
    fn: Callable
    state_keys: tuple[str, ...]
    hypers: tuple[str, ...]           # keyword-only names without a default: must be in every group
    optional_hypers: tuple[str, ...]  # keyword-only names with a default: passed when a group has them
    counts_steps: bool = field(default=False)
    uses_norms: bool = field(default=False)
    uses_whole: bool = field(default=False)  # gets `whole`, a `distributed.WholeTensors` of its params
    decays: bool = field(default=False)  # does its own decoupled weight decay, given `decay`
    scalars: Scalars | None = field(default=None)
    # State that is a weight, not an average (ScheduleFreeAdam's z): kept in float32 for 16-bit params
    # written back with Kahan summation or stochastic rounding, as their master weights would be.
    float32_state: tuple[str, ...] = field(default=())
    # Stepped a whole bucket at a time, not in cache-sized chunks: Muon batches equal shapes across a bucket.
    unchunked: bool = field(default=False)

    @classmethod
    def of(cls, fn: Callable) -> 'StepRule':
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional[:2] != ['p', 'g']:
            raise TypeError(f"A step rule's first parameters must be `p, g`; {fn} has {positional[:2]}")
        keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
        scalars = getattr(getattr(fn, 'func', fn), 'scalars', None)
        given = ('step', 'norms', 'decay', 'whole', *(scalars.initial if scalars else ()))  # by the engine, not read from the param group
        return cls(fn, state_keys=tuple(positional[2:]),
                   hypers=tuple(p.name for p in keyword if p.default is p.empty and p.name not in given),
                   optional_hypers=tuple(p.name for p in keyword if p.default is not p.empty and p.name not in given),
                   counts_steps=any(p.name == 'step' for p in keyword),
                   uses_norms=any(p.name == 'norms' for p in keyword),
                   uses_whole=any(p.name == 'whole' for p in keyword),
                   decays=any(p.name == 'decay' for p in keyword), scalars=scalars,
                   float32_state=getattr(getattr(fn, 'func', fn), 'float32_state', ()),
                   unchunked=getattr(getattr(fn, 'func', fn), 'unchunked', False))

    @property
    def name(self) -> str:
        fn = self.fn.func if hasattr(self.fn, 'func') else self.fn
        return getattr(fn, '__name__', repr(fn))
