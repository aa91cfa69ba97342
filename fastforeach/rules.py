"""A step rule, declared in one place: its state, its hypers with their checks, and what it asks of the core.

A step rule is a function over lists whose signature names what it takes::

    @declare(accumulation=Accumulation(ADAM_AVERAGES, adam_move))
    def adam_step(p, g, grad_avg, sqr_avg, *, step, lr, mom, sqr_mom, eps): ...

- positional `p, g`: the params and their gradients;
- further positional names: per-param state tensors under fastai's own keys, created as zeros on the
  first step, shaped like the param unless `declare(state=...)` says otherwise (`StateSpec`: scalars,
  a matrix's row and column statistics, any shape that is a function of the param's);
- keyword-only names: hypers read from the param group at every step, plus what the core gives:
  `step` (fastai's per-param step count, already incremented), `norms` (a `distributed.WholeNorms`:
  `norms(*lists)` gives the L2 norm of each whole param, also when the rule sees only this rank's shards),
  `whole` (a `distributed.WholeTensors` of its params), `decay` (each param's decoupled weight decay, for
  a rule that does its own) and its running scalars (`Scalars`).

A rule may return a dict of per-param values to store in the state (Larc's `local_lr`).

`declare` adds what the signature cannot say: how each state is shaped, the checks of the rule's own
hypers (beside the shared ones of fastai's vocabulary, `HYPERS`), running scalars, whether the rule steps
a whole bucket at once, and whether optimizer accumulation is defined for it (see `accumulation.py`).
`StepRule.of(fn)` reads both, looking through `functools.partial`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable

import torch

from .accumulation import Accumulation

__all__ = ['StepRule', 'Scalars', 'StateSpec', 'Check', 'declare', 'declaration', 'check_hyper', 'check_int', 'choice',
           'count', 'AT_LEAST_ZERO', 'FRACTION', 'CLOSED_FRACTION', 'HYPERS', 'LIKE_PARAM', 'SECOND_MOMENT', 'STATES', 'SCALAR',
           'ROWS', 'COLUMNS']


# --- state -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateSpec:
    """How a state tensor is made for its param: zeros of `shape(p)` in `dtype` (the param's when None).

    `shape` None means shaped like the param, and laid out like it (memory format, and sharding for
    DTensor params); only such state can be stepped by the elementwise fused forms. `reduces`: the state is
    a statistic of the param over these dims, kept as dims of size 1 (a matrix's row averages: (-1,)): laid
    out like the param along the others, so that it is sharded with it under FSDP2, replicated along a
    reduced dim the param is sharded on. `weight`: the state is a weight, not an average (ScheduleFreeAdam's
    z), kept in float32 for 16-bit params written back with Kahan summation or stochastic rounding, as
    their master weights would be.

    For state kept in few bits (`lowbit.py`): `average` says it may be (an average, not a value the rule
    must keep exactly, as Adan's previous gradient), `nonnegative` that it is never below 0 (a second
    moment: an unsigned map, all of whose codes serve values >= 0)."""
    shape: Callable[[torch.Tensor], tuple] | None = None
    dtype: torch.dtype | None = None
    weight: bool = False
    average: bool = True
    nonnegative: bool = False
    reduces: tuple[int, ...] = ()

    @property
    def like_param(self) -> bool: return self.shape is None and not self.reduces

    @property
    def shardable(self) -> bool:
        "Whether it can be laid out over a sharded param's mesh (like the param, or a statistic of it over dims)."
        return self.shape is None

    def dtype_for(self, p: torch.Tensor, float32_weights: bool = False) -> torch.dtype:
        "This state's dtype for `p` (`float32_weights`: 16-bit `p` stepped in float32, see `weight`)."
        if self.weight and float32_weights: return torch.float32
        return self.dtype or p.dtype

    def _reduced(self, shape) -> tuple:
        dims = {d % len(shape) for d in self.reduces}
        return tuple(1 if d in dims else n for d, n in enumerate(shape))

    def shape_for(self, p: torch.Tensor) -> tuple:
        if self.shape is not None: return tuple(self.shape(p))
        return self._reduced(p.shape)

    def placements_for(self, p) -> tuple:
        "How this state of DTensor `p` is laid out over its mesh: as `p`, replicated where `p` is sharded on a reduced dim."
        from torch.distributed.tensor import Replicate, Shard
        dims = {d % p.ndim for d in self.reduces}
        return tuple(Replicate() if isinstance(pl, Shard) and pl.dim % p.ndim in dims else pl for pl in p.placements)

    def zeros(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        "A new state tensor for `p`, all zeros (for a DTensor `p`, a DTensor laid out as `placements_for` says)."
        from .distributed import is_sharded, local
        if self.like_param: return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if not (self.reduces and is_sharded(p)): return torch.zeros(self.shape_for(p), dtype=dtype, device=p.device)
        from torch.distributed.tensor import DTensor
        shape = self.shape_for(p)
        zeros = torch.zeros(self._reduced(local(p).shape), dtype=dtype, device=p.device)
        return DTensor.from_local(zeros, p.device_mesh, self.placements_for(p), shape=shape,
                                  stride=torch.empty(shape, device='meta').stride(), run_check=False)

    def unlike(self, t, p: torch.Tensor) -> str | None:
        "None when `t`, saved for `p`, is a tensor of this state's shape for `p`; else what it is instead."
        expected = self.shape_for(p)
        if not isinstance(t, torch.Tensor): return f"is a {type(t).__name__}, expected a tensor of shape {expected}"
        return None if tuple(t.shape) == expected else f"has shape {tuple(t.shape)}, expected {expected}"


LIKE_PARAM = StateSpec()
SECOND_MOMENT = StateSpec(nonnegative=True)
# The state keys of fastai's vocabulary whose spec every rule shares unless it declares its own (as `HYPERS`).
STATES: dict[str, StateSpec] = {'sqr_avg': SECOND_MOMENT}
SCALAR = StateSpec(shape=lambda p: ())
# A matrix's (or a stack of matrices') statistics over its last dim (one per row) and over its
# second-to-last (one per column), kept as dims of size 1: what a factored second moment keeps (Adafactor's).
ROWS = StateSpec(reduces=(-1,))
COLUMNS = StateSpec(reduces=(-2,))


# --- hypers ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """What a hyper's value must be: `ok(value)`, said as `expected`. `kind`: 'real' (a finite real number,
    or a 1-element tensor of one), 'int' (an int, not a bool) or 'choice' (one of a few strings). `named`: a
    word taken besides those, for a value the rule works out at each step (Adafactor's eps1='auto')."""
    ok: Callable
    expected: str
    kind: str = 'real'
    named: str | None = None

    def __call__(self, name: str, value, where: str = '') -> None:
        "Raise `ValueError` naming `name` and `value` when `value` fails this check."
        if self.named is not None and isinstance(value, str):
            if value != self.named:
                raise ValueError(f"Invalid {name}{where}: {value!r} (must be {self.named!r} or a finite real number "
                                 f"{self.expected})")
            return
        if self.kind == 'choice':
            if not isinstance(value, str) or not self.ok(value):
                raise ValueError(f"Invalid {name}{where}: {value!r} (must be one of {self.expected})")
            return
        if self.kind == 'int':
            if not isinstance(value, Integral) or isinstance(value, bool) or not self.ok(value):
                raise ValueError(f"Invalid {name}{where}: {value!r} (must be an int {self.expected})")
            return
        if isinstance(value, torch.Tensor) and value.numel() == 1: value = value.item()
        if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not self.ok(value):
            raise ValueError(f"Invalid {name}{where}: {value!r} (must be a finite real number {self.expected})")


AT_LEAST_ZERO = Check(lambda v: v >= 0, '>= 0')
FRACTION = Check(lambda v: 0 <= v < 1, 'in [0, 1)')
CLOSED_FRACTION = Check(lambda v: 0 <= v <= 1, 'in [0, 1]')


def choice(*values: str) -> Check:
    "A hyper that names one of `values`."
    return Check(values.__contains__, repr(values), 'choice')


def count(low: int, high: int | None = None) -> Check:
    "A hyper that counts: an int in [low, high) (high None: no bound)."
    return Check(lambda v: v >= low and (high is None or v < high),
                 f">= {low}" if high is None else f"in [{low}, {high})", 'int')


def check_int(name: str, value, low: int, high: int | None = None, where: str = '') -> None:
    "Raise `ValueError` naming `name` and `value` when `value` is not an int in [low, high) (high None: no bound)."
    count(low, high)(name, value, where)


# The hypers of fastai's vocabulary that every optimizer shares; a rule declares the checks of its own.
HYPERS: dict[str, Check] = {'lr': AT_LEAST_ZERO, 'wd': AT_LEAST_ZERO, 'eps': AT_LEAST_ZERO, 'mom': FRACTION,
                            'sqr_mom': FRACTION}


def check_hyper(name: str, value, checks: dict[str, Check] = HYPERS, where: str = '') -> None:
    "Raise `ValueError` naming `name` and `value` when `checks` has a check for `name` that `value` fails."
    if name in checks: checks[name](name, value, where)


# --- declarations ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scalars:
    """Per-param running scalars of a rule: their `initial` values, and `advance(**current, **kwargs)`, their
    values for this step from the last ones and the step's keywords (`step` and the hypers)."""
    initial: dict
    advance: Callable


@dataclass(frozen=True)
class Declaration:
    "What `declare` records of a rule (see the module docstring)."
    state: dict = field(default_factory=dict)
    hypers: dict = field(default_factory=dict)
    scalars: Scalars | None = None
    unchunked: bool = False
    accumulation: Accumulation | str | None = None


def declare(*, state: dict[str, StateSpec] | None = None, hypers: dict[str, Check] | None = None,
            scalars: Scalars | None = None, unchunked: bool = False,
            accumulation: Accumulation | str | None = None) -> Callable:
    """Declare what a rule's signature cannot say (a decorator):

    - `state`: the `StateSpec` of each state key not shaped like its param (or a weight);
    - `hypers`: the checks of the rule's own hypers, beside the shared `HYPERS`;
    - `scalars`: its per-param running scalars (`Scalars`);
    - `unchunked`: it is stepped a whole bucket at a time, not in cache-sized chunks (Muon batches equal
      shapes across a bucket);
    - `accumulation`: how optimizer accumulation folds micro-batches into its averages (an `Accumulation`),
      or why it is not defined for this rule (a sentence)."""
    def mark(fn: Callable) -> Callable:
        fn.declared = Declaration(dict(state or {}), dict(hypers or {}), scalars, unchunked, accumulation)
        return fn
    return mark


def declaration(fn: Callable) -> Declaration:
    "What `fn` (or the function of a `functools.partial`) declared; an empty declaration when nothing."
    return getattr(getattr(fn, 'func', fn), 'declared', None) or Declaration()


@dataclass(frozen=True)
class StepRule:
    "What the core reads off a step rule: its signature and its declaration (see the module docstring)."
    fn: Callable
    state_keys: tuple[str, ...]
    hypers: tuple[str, ...]           # keyword-only names without a default: must be in every group
    optional_hypers: tuple[str, ...]  # keyword-only names with a default: passed when a group has them
    state: dict = field(default_factory=dict)   # state key -> StateSpec, for every key
    checks: dict = field(default_factory=dict)  # hyper -> Check: the shared ones and the rule's own
    counts_steps: bool = False
    uses_norms: bool = False
    uses_whole: bool = False  # gets `whole`, a `distributed.WholeTensors` of its params
    decays: bool = False  # does its own decoupled weight decay, given `decay`
    scalars: Scalars | None = None
    unchunked: bool = False
    accumulation: Accumulation | None = None
    no_accumulation: str = ''  # why optimizer accumulation is not defined for it, when it is not

    @classmethod
    def of(cls, fn: Callable) -> 'StepRule':
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional[:2] != ['p', 'g']:
            raise TypeError(f"A step rule's first parameters must be `p, g`; {fn} has {positional[:2]}")
        declared, keyword = declaration(fn), [p for p in params if p.kind == p.KEYWORD_ONLY]
        state_keys = tuple(positional[2:])
        unknown = set(declared.state) - set(state_keys)
        if unknown: raise TypeError(f"{fn} declares state {sorted(unknown)} that its signature does not take")
        names = {p.name for p in keyword}
        scalars = declared.scalars
        given = ('step', 'norms', 'decay', 'whole', *(scalars.initial if scalars else ()))  # by the core
        acc = declared.accumulation
        name = getattr(getattr(fn, 'func', fn), '__name__', repr(fn))
        return cls(fn, state_keys=state_keys,
                   hypers=tuple(p.name for p in keyword if p.default is p.empty and p.name not in given),
                   optional_hypers=tuple(p.name for p in keyword if p.default is not p.empty and p.name not in given),
                   state={k: declared.state.get(k, STATES.get(k, LIKE_PARAM)) for k in state_keys},
                   checks={**HYPERS, **declared.hypers},
                   counts_steps='step' in names, uses_norms='norms' in names, uses_whole='whole' in names,
                   decays='decay' in names, scalars=scalars, unchunked=declared.unchunked,
                   accumulation=acc if isinstance(acc, Accumulation) else None,
                   no_accumulation='' if isinstance(acc, Accumulation) else acc or f"{name} does not say how")

    def __reduce__(self):
        "Pickled as its function (whose declaration holds lambdas): read off it again when unpickled."
        return StepRule.of, (self.fn,)

    @property
    def name(self) -> str:
        fn = self.fn.func if hasattr(self.fn, 'func') else self.fn
        return getattr(fn, '__name__', repr(fn))

    @property
    def like_params(self) -> bool:
        "Whether every state of this rule is shaped like its param (what fused forms and FSDP2 shards need)."
        return all(spec.like_param for spec in self.state.values())

    @property
    def weight_state(self) -> tuple[str, ...]:
        "The state keys that are weights (see `StateSpec.weight`)."
        return tuple(k for k, spec in self.state.items() if spec.weight)
