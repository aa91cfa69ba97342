"""The one engine behind every fastforeach optimizer.

`ForEachOptimizer` is a `fastai.optimizer.Optimizer` whose `step` gathers, once per step, every param
that has a gradient together with its gradient, its state and its `do_wd` flag, applies weight decay,
and hands whole lists of tensors to a pure *step rule* (see `rules.py`) or to its fused form (`fused/`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from numbers import Integral, Real
from typing import Callable

import torch
from fastai.optimizer import Optimizer
from fastcore.foundation import L

from .accumulation import accumulation_of, fold
from .checkpoint import TorchOptimizerView
from .distributed import (LOCAL_NORMS, WholeTensors, as_like, check_layout, is_sharded, layout, local, norms_for,
                          wrap_like)
from .fused import Context, FusedStep, Plans
from .rules import StepRule
from .ops import mul_scalar_
from .precision import COMP, Rounding, is_low_precision

__all__ = ['ForEachOptimizer', 'StepRule', 'check_hyper', 'check_int', 'check_params', 'debias', 'fastai_steppers', 'unlike_param']

# On CPU a foreach op is a loop over tensors, so a rule of N ops streams the whole model through memory
# N times. Cutting a bucket into chunks that fit in cache makes the N ops reuse what the first one
# loaded; on GPU one launch over everything is best.
CPU_CHUNK_BYTES = 1 << 20
# 16-bit params stepped on float32 working copies are stepped in runs of at most this many bytes (of the
# params) on a GPU too, so that the copies stay small beside the model.
FLOAT32_CHUNK_BYTES = 64 << 20


def debias(mom: float, damp: float, step: int) -> float:
    "Sum of the weights an exponential average with `mom` and `damp` has given to `step` values."
    return damp * (1 - mom**step) / (1 - mom)


def _at_least_zero(v): return v >= 0
def _fraction(v): return 0 <= v < 1
def _closed_fraction(v): return 0 <= v <= 1


# Range of every hyper a rule may read: (predicate, what the predicate says).
HYPER_RANGES: dict[str, tuple[Callable, str]] = {
    'lr': (_at_least_zero, '>= 0'),
    'wd': (_at_least_zero, '>= 0'),
    'eps': (_at_least_zero, '>= 0'),
    'mom': (_fraction, 'in [0, 1)'),
    'sqr_mom': (_fraction, 'in [0, 1)'),
    'beta': (_at_least_zero, '>= 0'),
    'nu_1': (_closed_fraction, 'in [0, 1]'),
    'nu_2': (_closed_fraction, 'in [0, 1]'),
    'trust_coeff': (_at_least_zero, '>= 0'),
    'beta1': (_fraction, 'in [0, 1)'),
    'beta2': (_fraction, 'in [0, 1)'),
    'beta3': (_fraction, 'in [0, 1)'),
    'warmup_steps': (_at_least_zero, '>= 0'),
    'r': (_at_least_zero, '>= 0'),
    'weight_lr_power': (_at_least_zero, '>= 0'),
}
# Hypers that name a choice: their allowed values (optimizer modules add theirs).
HYPER_CHOICES: dict[str, tuple] = {}
# Hypers that count: their (lowest, past the highest or None) (optimizer modules add theirs).
HYPER_INTS: dict[str, tuple[int, int | None]] = {}


def check_int(name: str, value, low: int, high: int | None = None, where: str = '') -> None:
    "Raise `ValueError` naming `name` and `value` when `value` is not an int in [low, high) (high None: no bound)."
    outside = not isinstance(value, Integral) or isinstance(value, bool) or value < low
    if outside or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be an int {span})")


def check_hyper(name: str, value, where: str = '') -> None:
    """Raise `ValueError` naming `name` and `value` when `value` is not a number in the hyper's range, not one
    of its choices, or not an int in its span."""
    if name in HYPER_CHOICES and (not isinstance(value, str) or value not in HYPER_CHOICES[name]):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be one of {HYPER_CHOICES[name]})")
    if name in HYPER_INTS: check_int(name, value, *HYPER_INTS[name], where=where)
    if name not in HYPER_RANGES: return
    ok, expected = HYPER_RANGES[name]
    if isinstance(value, torch.Tensor) and value.numel() == 1: value = value.item()
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be a finite real number {expected})")


def check_params(params: L) -> None:
    "Raise `TypeError` for torch.optim-style param groups (dicts): fastai's optimizers take lists of tensors."
    for group in params:
        if isinstance(group, dict):
            raise TypeError("Invalid params: a param group given as a dict (torch.optim style, as "
                            "ZeroRedundancyOptimizer passes them). fastai-style optimizers take a list of tensors, "
                            "or a list of lists for several groups, with hypers as keywords; to shard optimizer "
                            "state across ranks, shard the model with FSDP2 (torch.distributed.fsdp.fully_shard)")


def fastai_steppers(factory: Callable, n_groups: int, **options) -> list:
    """The stepper callbacks of the optimizer fastai's `factory` builds with `options` (lr among them) for
    `n_groups` param groups: per-group hypers (lists, slices) are spread over as many groups as they were given for."""
    return list(factory([[torch.zeros(1)] for _ in range(n_groups)], **options).cbs)


def unlike_param(t, p: torch.Tensor):
    "None when `t`, saved for `p`, is a tensor of `p`'s shape; else what it is instead ('has shape (3,)', 'is a float')."
    if not isinstance(t, torch.Tensor): return f"is a {type(t).__name__}"
    return None if t.shape == p.shape else f"has shape {tuple(t.shape)}"


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

    def chunks(self, max_bytes: int):
        "Split into runs of params whose total size stays under `max_bytes` (a param alone may exceed it)."
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
        for i, (p, g) in enumerate(zip(self.params, self.grads)): check_layout(p, g, f"of shape {tuple(p.shape)}")
        return Bucket([local(p) for p in self.params], [local(g) for g in self.grads], self.states, self.params,
                      norms_for(self.params[0]))


class ForEachOptimizer(Optimizer):
    """A fastai `Optimizer` that updates whole lists of tensors with one step rule.

    Weight decay comes first, as in fastai: decoupled, `p ← p·(1 − lr·wd)`, or L2, `g ← g + wd·p`, on the
    params whose state does not say `do_wd=False`. Then `opt_step` (see the module docstring) runs once
    per (group, device, dtype, step count), cut into cache-sized chunks on CPU.

    `opt_step` may also be a `FusedStep` (see `fused/`): the same rule done in one pass over memory,
    weight decay included.

    16-bit params (bfloat16, float16) are stepped as `rounding` says (see `precision.py`): on float32
    working values written back with Kahan summation (`'kahan'`, its buffer in `kahan_dtype`) or
    stochastic rounding (`'stochastic'`), or, with `'nearest'`, by the steppers of the optimizer that
    fastai's factory `fastai` builds with the same hypers and `fastai_options`, bit for bit as fastai does
    (without `fastai`, the rule steps them as they are, each op rounded to 16 bits).
    """
    def __init__(self, params, opt_step: Callable, decouple_wd: bool = True, *, rounding: str = 'kahan',
                 kahan_dtype: torch.dtype = torch.float32, fastai: Callable | None = None, fastai_options: dict = None,
                 **defaults):
        self.rounding = Rounding(rounding, kahan_dtype)
        self.fused = opt_step if isinstance(opt_step, FusedStep) else None
        self.fused_plans = Plans()  # what the fused step keeps between steps, for this optimizer only
        self.rule = StepRule.of(opt_step.rule if self.fused else opt_step)
        self.decouple_wd = decouple_wd
        missing = [h for h in self.rule.hypers if h not in defaults]
        if missing: raise TypeError(f"{self.rule.name} needs hypers {missing}; give them as keywords")
        params = L(params)  # as fastai reads it: a lone tensor is one param, a list of lists is param groups
        if not params: raise ValueError("Invalid params: an empty list (the optimizer has nothing to update)")
        check_params(params)
        super().__init__(params, cbs=[], **defaults)
        # fastai's own steppers for this optimizer: how 16-bit params are stepped with rounding='nearest'.
        self.steppers = None if fastai is None else fastai_steppers(
            fastai, len(self.param_lists), decouple_wd=decouple_wd, **defaults, **(fastai_options or {}))
        # Whether any param is a DTensor (FSDP2): fixed once the optimizer holds its params.
        self.sharded = any(is_sharded(p) for pg in self.param_lists for p in pg)
        # (micro-batch index, number of micro-batches) while optimizer accumulation is on (see accumulation.py)
        self.accumulation = None

    def __iter__(self):
        """This optimizer as a `torch.optim.Optimizer` (`checkpoint.TorchOptimizerView`): torch.distributed.checkpoint's
        `get_optimizer_state_dict(model, optimizers)` takes an optimizer or an iterable of them."""
        yield TorchOptimizerView(self)

    # --- hypers -------------------------------------------------------------------------------------
    def _set_hyper(self, k, v):
        v = list(v)
        for i, value in enumerate(v): check_hyper(k, value, self._group_label(i, len(v)))
        super()._set_hyper(k, v)

    def _group_label(self, i, n): return f" for param group {i}" if n > 1 else ''

    def check_hypers(self) -> None:
        "Validate every group's hypers; raise `ValueError` before anything is modified."
        for i, hyper in enumerate(self.hypers):
            for k, v in hyper.items(): check_hyper(k, v, self._group_label(i, len(self.hypers)))

    def zero_grad(self):
        """fastai's `zero_grad`, in place, as one foreach op. Gradients may be views of a pack's buffer (see
        `fused.Pack`), which fastai's own `detach_()` refuses."""
        grads = [p.grad for pg in self.param_lists for p in pg if p.grad is not None]
        for g in grads:
            if g.grad_fn is not None: g.detach_()
            else: g.requires_grad_(False)
        if grads: torch._foreach_zero_(grads)

    # --- step ---------------------------------------------------------------------------------------
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        self.check_hypers()
        with torch.no_grad(): self._step_all()
        return loss

    def step_params(self, params) -> None:
        "A step of only `params` (those of them with a gradient): one bucket of a gradient release (see `release.py`)."
        self.check_hypers()
        with torch.no_grad(): self._step_all({id(p) for p in params})

    def _step_all(self, only: set | None = None) -> None:
        "Gather the params with a gradient (those whose ids are in `only`, if given) and step them."
        self._step(self._gather(only))

    def check_accumulation(self) -> None:
        "Raise `ValueError` when optimizer accumulation (see `accumulation.py`) is not defined for this optimizer."
        found, why = accumulation_of(self.rule.fn)
        if found is None: raise ValueError(f"Optimizer accumulation is not defined for {type(self).__name__}: {why}")

    def _accumulate(self, bucket: Bucket, hyper: dict, kwargs: dict):
        """Micro-batch `index` of `n` (`self.accumulation`): L2 and the gradients folded into the averages;
        on the last, the step counted, decoupled weight decay and the rule's move of the params."""
        index, n = self.accumulation
        acc, last = accumulation_of(self.rule.fn)[0], index == self.accumulation[1] - 1
        if self.rounding.in_float32(bucket.params[0]):
            raise ValueError("Optimizer accumulation of 16-bit params is not supported (rounding='nearest' aside)")
        if last: kwargs = {**kwargs, **self._count_step(bucket)}
        if self.rule.uses_norms: kwargs = {**kwargs, 'norms': bucket.norms}
        size = self._chunk_bytes(bucket, in_float32=False)
        for chunk in bucket.chunks(size) if size else [bucket]:
            states = self._state_lists(chunk)
            if not self.decouple_wd: self._weight_decay(chunk, hyper)  # L2: into each micro-batch's gradient
            fold(acc, chunk.grads, dict(zip(self.rule.state_keys, states)), kwargs, index, n)
            if last:
                if self.decouple_wd: self._weight_decay(chunk, hyper)
                acc.move(chunk.params, *states, **kwargs)

    def finish_step(self) -> None:
        "What follows the steps of every bucket of a gradient release: nothing here (Lookahead counts and syncs)."

    def _step(self, groups):
        for hyper, buckets in groups:
            kwargs = {k: hyper[k] for k in self.rule.hypers}
            kwargs.update({k: hyper[k] for k in self.rule.optional_hypers if k in hyper})
            for bucket in buckets:
                p0 = bucket.params[0]
                if self.accumulation is not None:
                    self._accumulate(bucket, hyper, kwargs)
                    continue
                if self._as_fastai(p0):
                    self._run_fastai(bucket, hyper)
                    continue
                kwargs.update(self._count_step(bucket))
                if self.rule.scalars is not None: kwargs.update(self._advance_scalars(bucket, kwargs))
                in_float32 = self.rounding.in_float32(p0)
                if self.fused is not None and self.fused.ready(p0, kwargs, self.rounding if in_float32 else None):
                    self._run_fused(bucket, hyper, kwargs, in_float32)
                    continue
                size = self._chunk_bytes(bucket, in_float32)
                for chunk in bucket.chunks(size) if size else [bucket]:
                    if in_float32: self._run_in_float32(chunk, hyper, kwargs)
                    else:
                        self._store(chunk, self._run_rule(chunk, {**kwargs, **self._weight_decay(chunk, hyper)}))

    def _chunk_bytes(self, bucket: Bucket, in_float32: bool) -> int | None:
        "Bytes of params per run of the rule over `bucket` (see `CPU_CHUNK_BYTES`), or None: all of it at once."
        # Sharded buckets stay whole: a rule that needs norms then all-reduces once per bucket.
        if bucket.sharded or self.rule.unchunked: return None
        if bucket.params[0].device.type == 'cpu': return CPU_CHUNK_BYTES
        return FLOAT32_CHUNK_BYTES if in_float32 else None

    def _count_step(self, bucket: Bucket) -> dict:
        "For a rule that counts steps: the bucket's params' step count, advanced in their states, as `step`."
        if not self.rule.counts_steps: return {}
        step = bucket.states[0].get('step', 0) + 1
        for state in bucket.states: state['step'] = step
        return {'step': step}

    def _advance_scalars(self, bucket: Bucket, kwargs: dict) -> dict:
        "The rule's running scalars for this step (see `rules.Scalars`), stored in the bucket's states."
        scalars = self.rule.scalars
        new = scalars.advance(**{k: bucket.states[0].get(k, v) for k, v in scalars.initial.items()}, **kwargs)
        for state in bucket.states: state.update(new)
        return new

    def _gather(self, only: set | None = None):
        "Per group: its hypers and its buckets of params with a gradient (of those whose ids are in `only`, if given)."
        groups = []
        for pg, hyper in zip(self.param_lists, self.hypers):
            params, grads = [], []
            for p in pg:
                g = p.grad
                if g is not None and (only is None or id(p) in only) and self._takes(p): params.append(p); grads.append(g)
            if not params: continue
            for p, g in zip(params, grads):
                if g.is_sparse:
                    raise RuntimeError(f"fastforeach does not support sparse gradients (param of shape {tuple(p.shape)})")
            groups.append((hyper, self._buckets(params, grads, [self.state[p] for p in params])))
        return groups

    @property
    def fused_steps(self) -> list:
        "The fused steps this optimizer runs (none unless built with `fused=True`)."
        return [self.fused] if self.fused is not None else []

    def _takes(self, p) -> bool:
        "Whether this step takes `p` (an optimizer with several rules steps its params rule by rule: Muon)."
        return True

    def _rule_of(self, p, state: dict) -> StepRule:
        "The rule that steps `p`, whose keys its `state` holds."
        return self.rule

    def _buckets(self, params, grads, states) -> list[Bucket]:
        """One group's params split by device, dtype and, for rules that count steps, step count (and running
        scalars); in order."""
        group = Bucket(params, grads, states)
        by_device = torch._C._group_tensors_by_device_and_dtype([params], True)  # in C++: 0.1 µs a param
        runs = [group] if len(by_device) == 1 else [
            group.pick(idx) for _, idx in sorted((idx[0], idx) for _, idx in by_device.values())]
        if self.sharded: runs = [b for run in runs for b in self._by_layout(run)]
        if not self.rule.counts_steps: return runs
        buckets, keys = [], ('step', *(self.rule.scalars.initial if self.rule.scalars else ()))
        for run in runs:
            steps = [tuple(state.get(k, 0) for k in keys) for state in run.states]
            if steps.count(steps[0]) == len(steps): buckets.append(run); continue
            by_step = {}
            for i, step in enumerate(steps): by_step.setdefault(step, []).append(i)
            buckets += [run.pick(idx) for idx in by_step.values()]
        return buckets

    @staticmethod
    def _by_layout(run: Bucket) -> list[Bucket]:
        "`run` split by layout (plain, or a DTensor's mesh and placements), DTensors as their local shards."
        by_layout = {}
        for i, p in enumerate(run.params): by_layout.setdefault(layout(p), []).append(i)
        subs = [run] if len(by_layout) == 1 else [run.pick(idx) for idx in by_layout.values()]
        return [sub.shards() if is_sharded(sub.params[0]) else sub for sub in subs]

    def _weight_decay(self, chunk: Bucket, hyper: dict) -> dict:
        """Weight decay of the chunk's params whose `do_wd` is not False. A rule that does its decoupled
        decay itself (see `rules.py`) is given it instead: the `decay` keyword this returns."""
        lr, wd = hyper['lr'], hyper.get('wd', 0.)
        if self.rule.decays and self.decouple_wd:
            return {'decay': [wd if state.get('do_wd', True) else 0. for state in chunk.states]}
        if wd == 0: return {}
        idx = [i for i, state in enumerate(chunk.states) if state.get('do_wd', True)]
        if not idx: return {}
        params = [chunk.params[i] for i in idx]
        if self.decouple_wd: mul_scalar_(params, 1 - lr * wd)
        else: torch._foreach_add_([chunk.grads[i] for i in idx], params, alpha=wd)
        return {}

    def _state_lists(self, chunk: Bucket):
        """The chunk's state tensors, one list per state key (local shards for a sharded chunk); missing ones
        are created as zeros first, like their params (DTensors sharded alike for DTensor params)."""
        try: lists = [[state[key] for state in chunk.states] for key in self.rule.state_keys]
        except KeyError:
            # Only in a step, after every check has passed: a refused step leaves no trace.
            for p, state in zip(chunk.origins, chunk.states):
                for key in self.rule.state_keys:
                    if key not in state:
                        state[key] = torch.zeros_like(p, dtype=self._state_dtype(key, p), memory_format=torch.preserve_format)
            return self._state_lists(chunk)
        return [[local(t) for t in xs] for xs in lists] if chunk.sharded else lists

    def _run_rule(self, chunk: Bucket, kwargs: dict, states: list | None = None):
        if self.rule.uses_norms: kwargs = {**kwargs, 'norms': chunk.norms}
        if self.rule.uses_whole: kwargs = {**kwargs, 'whole': WholeTensors(chunk.origins)}
        states = self._state_lists(chunk) if states is None else states
        return self.rule.fn(chunk.params, chunk.grads, *states, **kwargs)

    def _run_in_float32(self, chunk: Bucket, hyper: dict, kwargs: dict):
        """Weight decay and the rule on float32 copies of the chunk's 16-bit params (with their Kahan
        buffers added), gradients and state; then the state rounded back and the params written back as
        `rounding` says. The gradients are left as they were (L2 goes into the copies)."""
        states = self._state_lists(chunk)
        comps = self.rounding.compensations(chunk.origins, chunk.states)
        if comps is not None and chunk.sharded: comps = [local(c) for c in comps]
        work = Bucket(self.rounding.working(chunk.params, comps), [g.float() for g in chunk.grads], chunk.states,
                      norms=chunk.norms)
        states32 = [[t.float() for t in xs] for xs in states]
        out = self._run_rule(work, {**kwargs, **self._weight_decay(work, hyper)}, states32)
        for xs, ys in zip(states, states32): torch._foreach_copy_(xs, ys)
        self.rounding.write_back(chunk.params, work.params, comps)
        self._store(chunk, out)

    def _state_dtype(self, key: str, p) -> torch.dtype:
        "The dtype of state `key` of `p`: `p`'s, or float32 for a weight-like state of a 16-bit `p` (see `StepRule`)."
        return torch.float32 if key in self.rule.float32_state and self.rounding.in_float32(p) else p.dtype

    def _keeps_comp(self, p) -> bool:
        "Whether params like `p` have a Kahan buffer here: 16 bits, Kahan summation."
        return self.rounding.kahan and self.rounding.in_float32(p)

    def _as_fastai(self, p) -> bool:
        "Whether params like `p` are stepped by fastai's own steppers: 16 bits, rounded to nearest."
        return self.steppers is not None and self.rounding.mode == 'nearest' and is_low_precision(p.dtype)

    def _run_fastai(self, bucket: Bucket, hyper: dict):
        "fastai's step, one param at a time: every stepper's result merged into the param's state, as fastai does."
        for p, state in zip(bucket.origins, bucket.states):
            for stepper in self.steppers:
                new = stepper(p, **{**state, **hyper})
                if isinstance(new, dict): state.update(new)

    def _run_fused(self, bucket: Bucket, hyper: dict, kwargs: dict, in_float32: bool):
        do_wd = [state.get('do_wd', True) for state in bucket.states]
        comps = self.rounding.compensations(bucket.origins, bucket.states) if in_float32 else None
        if comps is not None and bucket.sharded: comps = [local(c) for c in comps]
        context = Context(norms=bucket.norms, sizes=[p.numel() for p in bucket.origins] if bucket.sharded else None,
                          rounding=self.rounding if in_float32 else None, comps=comps)
        self._store(bucket, self.fused.run(bucket.params, bucket.grads, self._state_lists(bucket), do_wd, kwargs,
                                           wd=hyper.get('wd', 0.), decouple_wd=self.decouple_wd,
                                           plans=self.fused_plans, context=context))

    def _store(self, chunk: Bucket, out):
        """Put a step's per-param values into the state: state tensors of sharded params that the step moved
        (a fused step's pack) as DTensors around their new local shards, other values as they are."""
        for key, values in (out or {}).items():
            if chunk.sharded and (key in self.rule.state_keys or key == COMP):
                values = [wrap_like(v, p) for v, p in zip(values, chunk.origins)]
            for state, value in zip(chunk.states, values): state[key] = value

    # --- state dict ---------------------------------------------------------------------------------
    def check_state_dict(self, sd: dict) -> None:
        "Raise `ValueError` saying which group, param and key of `sd` does not fit this optimizer."
        if not isinstance(sd, dict) or 'state' not in sd or 'hypers' not in sd:
            raise ValueError("Invalid state dict: expected a dict with 'state' and 'hypers'")
        n_groups, n_params = len(self.param_lists), sum(len(pg) for pg in self.param_lists)
        if len(sd['hypers']) != n_groups:
            raise ValueError(f"Invalid state dict: {len(sd['hypers'])} param groups, the optimizer has {n_groups}")
        if len(sd['state']) != n_params:
            raise ValueError(f"Invalid state dict: {len(sd['state'])} params, the optimizer has {n_params}")
        for i, hyper in enumerate(sd['hypers']):
            missing = [h for h in self.rule.hypers if h not in hyper]
            if missing: raise ValueError(f"Invalid state dict: param group {i} lacks hypers {missing}")
            for k, v in hyper.items(): check_hyper(k, v, f" in the state dict's param group {i}")
        states = iter(sd['state'])
        for gi, pg in enumerate(self.param_lists):
            for pi, p in enumerate(pg):
                state = next(states)
                where = f"param group {gi}, param {pi} (shape {tuple(p.shape)})"
                if not isinstance(state, dict): raise ValueError(f"Invalid state dict: {where}: state is not a dict")
                rule = self._rule_of(p, state)
                for key in rule.state_keys:
                    # A param that never stepped has no state in fastai either.
                    if key not in state:
                        if 'step' in state or any(k in state for k in rule.state_keys):
                            raise ValueError(f"Invalid state dict: {where}: missing state {key!r}")
                        continue
                    got = unlike_param(state[key], p)
                    if got: raise ValueError(f"Invalid state dict: {where}: state {key!r} {got}")
                if COMP in state:
                    got = unlike_param(state[COMP], p)
                    if got: raise ValueError(f"Invalid state dict: {where}: state {COMP!r} {got}")
                if rule.counts_steps and any(k in state for k in rule.state_keys):
                    step = state.get('step')
                    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                        raise ValueError(f"Invalid state dict: {where}: state 'step' is {step!r}, expected an int >= 1")

    def load_state_dict(self, sd: dict):
        "Load a state dict saved by this optimizer or by fastai's native one of the same kind."
        self.check_state_dict(sd)
        params = [p for pg in self.param_lists for p in pg]
        state = defaultdict(dict)
        for p, s in zip(params, sd['state']):
            s = dict(s)
            for key in self._rule_of(p, s).state_keys:
                if key in s: s[key] = as_like(s[key], p, self._state_dtype(key, p))
            if COMP in s:  # kept where this optimizer sums 16-bit params with Kahan, in its buffers' dtype
                comp = s.pop(COMP)
                if self._keeps_comp(p): s[COMP] = as_like(comp, p, self.rounding.kahan_dtype)
            state[p] = s
        self.hypers = type(self.hypers)(dict(h) for h in sd['hypers'])
        self.state = state
