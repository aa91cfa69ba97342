"""The core every fastforeach optimizer steps with: no fastai, no torch.optim, only params, gradients, state
and hypers.

`Core.step(groups, state)` takes the param groups as `(hypers, params)` pairs and the per-param state as a
mapping from param to dict: a face (the fastai `Optimizer` in `fastai.py`) passes its own containers. Each
step gathers, once, every param that has a gradient with its gradient and state, splits each group into
buckets (see `buckets.py`), and steps each bucket on one of the paths of `paths.py`, with the rule of
the route that takes its params (one route for most optimizers; Muon has two).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import is_sharded, run_error, wrap_like
from ..fused import FUSED_16BIT, FusedStep, Plans, fused_form
from ..lowbit import plain_state, state_format_of
from ..precision import COMP, Rounding, is_low_precision
from ..rules import StepRule, check_hyper
from . import paths
from .buckets import Bucket, buckets
from .state import check_param_state, load_param_state

__all__ = ['Core', 'Route', 'Routed', 'routes_of']


@dataclass
class Route:
    """The params a rule steps: those for which `takes(p, state)` is true (all, when None), with the rule's
    fused form (None: the foreach rule); `for_16bit`, for a foreach rule that has a fused form
    (`fused.fused_form`), the route of that form, which steps 16-bit params (see `fused.FUSED_16BIT`)."""
    rule: StepRule
    fused: FusedStep | None = None
    takes: Callable | None = None
    for_16bit: 'Route | None' = None

    @classmethod
    def of(cls, opt_step: Callable, takes: Callable | None = None) -> 'Route':
        "The route of a step rule, or of a `FusedStep` (whose rule it reads)."
        fused = opt_step if isinstance(opt_step, FusedStep) else None
        rule, twin = StepRule.of(fused.rule if fused else opt_step), None if fused else fused_form(opt_step)
        return cls(rule, fused, takes, cls(rule, twin, takes) if twin is not None else None)


@dataclass(frozen=True)
class Routed:
    """Several steps (rules or fused steps) in one optimizer, each for the params its predicate takes:
    `Routed(((step, takes), ...))`, `takes(p, state)` true for the params of that step and no other (as
    Adafactor's factored rule for matrices and its plain one for the rest)."""
    steps: tuple


def routes_of(opt_step) -> list[Route]:
    "The routes of a step rule, a `FusedStep` (one route for every param) or a `Routed`."
    if isinstance(opt_step, Routed): return [Route.of(step, takes) for step, takes in opt_step.steps]
    return [Route.of(opt_step)]


class Core:
    """Steps param groups with the rules of its `routes`, weight decay first (decoupled, `p ← p·(1 − lr·wd)`,
    or L2, `g ← g + wd·p`, on the params whose state does not say `do_wd=False`), 16-bit params as
    `rounding` says (see `precision.py`).

    `steppers`: fastai-style per-param steppers of the same optimizer, for 16-bit params with
    `rounding='nearest'` (bit for bit as fastai); `accumulation`: (micro-batch index, number of micro-batches)
    while optimizer accumulation is on. `plans` is what fused steps keep between steps. `l2_into_grads`:
    the foreach rules' L2 goes into the gradients themselves, as fastai's does; False: into new tensors,
    the gradients left as they were, as torch.optim's (fused steps never write the gradients).
    `state_format`: which averages are kept in 8 or 4 bits (see `lowbit.py`)."""
    def __init__(self, opt_step: Callable, decouple_wd: bool = True, rounding: str = 'kahan',
                 kahan_dtype: torch.dtype = torch.float32,
                 steppers: list | None = None, l2_into_grads: bool = True, state_format=None):
        self.rounding = Rounding(rounding, kahan_dtype)
        self.state_format = state_format_of(state_format)
        if self.state_format is not None and rounding == 'nearest':
            raise ValueError("Invalid state_format with rounding='nearest': 16-bit params are then stepped by fastai's "
                             "own steppers, whose state stays in the params' dtype (use 'kahan' or 'stochastic')")
        self.routes = routes_of(opt_step)  # sets `checks` too
        self.decouple_wd, self.steppers, self.accumulation = decouple_wd, steppers, None
        self.l2_into_grads = l2_into_grads
        self.plans, self.sharded = Plans(), False

    def __getstate__(self):
        "Pickled without `checks` (their predicates are lambdas): made again from the routes when unpickled."
        return {k: v for k, v in self.__dict__.items() if k != 'checks'}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.routes = self._routes

    @property
    def rule(self) -> StepRule: return self.routes[0].rule

    @property
    def routes(self) -> list[Route]: return self._routes

    @routes.setter
    def routes(self, routes: list[Route]):
        "The routes, and `checks`: the checks of every hyper their rules read (made once, not at every step)."
        self._routes = routes
        self.checks = {k: v for route in routes for k, v in route.rule.checks.items()}
        if self.state_format is not None:
            for route in routes: self.state_format.check(route.rule)

    @property
    def fused_steps(self) -> list:
        "The fused steps this core runs (none unless built with one)."
        return [route.fused for route in self.routes if route.fused is not None]

    def hold(self, params) -> None:
        "Take note of the params this core will step: whether any is a DTensor (FSDP2), which its rules must allow."
        self.sharded = any(is_sharded(p) for p in params)
        for p in params: self.rounding.check(p)
        if self.state_format is not None:  # few-bit state of a shard: a run of the flat order, 8-bit codes
            for p in filter(is_sharded, params):
                formats = {fmt for route in self.routes for fmt in self.state_format.keys(route.rule, p).values()}
                if not formats: continue
                unsharded = sorted(f.name for f in formats if not f.in_runs)
                why = run_error(p) or (f"state_format {unsharded} (its codes pack two elements a byte)" if unsharded else None)
                if why: raise ValueError(f"Invalid params: a DTensor of shape {tuple(p.shape)} with state in few bits "
                                         f"cannot be sharded so: {why}")
        for route in self.routes:
            odd = [k for k, spec in route.rule.state.items() if not spec.shardable]
            if self.sharded and odd:
                raise ValueError(f"Invalid params: DTensors (FSDP2) for {route.rule.name}, whose state {odd} is neither "
                                 "shaped like its param nor a statistic of it over some of its dims (only such state "
                                 "is sharded with it)")

    # --- hypers ------------------------------------------------------------------------------------
    def check_hypers(self, hypers: list[dict]) -> None:
        "Validate every group's hypers; raise `ValueError` naming the group, before anything is modified."
        for i, hyper in enumerate(hypers):
            where = f" for param group {i}" if len(hypers) > 1 else ''
            for k, v in hyper.items(): check_hyper(k, v, self.checks, where)

    def check_accumulation(self, name: str) -> None:
        "Raise `ValueError` when optimizer accumulation (see `accumulation.py`) is not defined for this core's rules."
        if self.state_format is not None:
            raise ValueError(f"Optimizer accumulation is not defined for {name} with state_format (its averages "
                             "would be decoded and encoded at every micro-batch)")
        for route in self.routes:
            if route.rule.accumulation is None:
                raise ValueError(f"Optimizer accumulation is not defined for {name}: {route.rule.no_accumulation}")

    # --- step --------------------------------------------------------------------------------------
    def step(self, groups, state, only: set | None = None) -> None:
        """Step the params of `groups` (`(hypers, params)` pairs) that have a gradient (and whose ids are in
        `only`, if given), route by route; `state` maps each param to its state dict."""
        groups = list(groups)
        for route in self.routes:
            for hyper, group in self._gather(route, groups, state, only):
                kwargs = {k: hyper[k] for k in route.rule.hypers}
                kwargs.update({k: hyper[k] for k in route.rule.optional_hypers if k in hyper})
                for bucket in group: self._step_bucket(route, bucket, hyper, kwargs)

    def _gather(self, route: Route, groups, state, only):
        "Per group: its hypers and its buckets of the route's params with a gradient."
        out = []
        for hyper, pg in groups:
            params = [p for p in pg if p.grad is not None]  # comprehensions: this runs for every param at every step
            if only is not None: params = [p for p in params if id(p) in only]
            if route.takes is not None: params = [p for p in params if route.takes(p, state[p])]
            if not params: continue
            grads = [p.grad for p in params]
            for p, g in zip(params, grads):
                if g.is_sparse:
                    raise RuntimeError(f"fastforeach does not support sparse gradients (param of shape {tuple(p.shape)})")
            out.append((hyper, buckets(params, grads, [state[p] for p in params], route.rule, self.sharded)))
        return out

    def path_for(self, route: Route, p, kwargs: dict, sharded: bool = False, fused: bool = True):
        """The path that steps a bucket of params like `p` with this step's `kwargs` (see `paths.py`): the
        route's fused step where `fused` and it is ready. Shards of params (`sharded`) whose fused step
        reduces state not shaped like them (per param, in its compiled update) are stepped by the foreach
        rule, which completes its statistics across ranks."""
        in_float32 = self.rounding.in_float32(p)
        if (fused and route.fused is not None and not (sharded and not route.fused.param_shaped) and
                route.fused.ready(p, kwargs, self.rounding if in_float32 else None)):
            return paths.FUSED
        return paths.FLOAT32 if in_float32 else paths.FOREACH

    def _step_bucket(self, route: Route, bucket: Bucket, hyper: dict, kwargs: dict) -> None:
        p0 = bucket.params[0]
        if self.accumulation is not None: return paths.ACCUMULATE.step(self, route, bucket, hyper, kwargs)
        if self.as_fastai(p0): return paths.NEAREST.step(self, route, bucket, hyper, kwargs)
        if route.for_16bit is not None and p0.device.type in FUSED_16BIT and self.rounding.in_float32(p0):
            route = route.for_16bit
        kwargs = {**kwargs, **self.count_step(route.rule, bucket)}
        if route.rule.scalars is not None: kwargs.update(self._advance_scalars(route.rule, bucket, kwargs))
        # The params the fused step does not take (`FusedStep.takes`) on the rule's own path, the others on its.
        takes = route.fused.takes if route.fused is not None else None
        taken = [takes(p) for p in bucket.origins] if takes is not None else [route.fused is not None]
        if any(taken) and not all(taken):
            self._step_counted(route, bucket.pick([i for i, t in enumerate(taken) if not t]), hyper, kwargs, False)
            bucket = bucket.pick([i for i, t in enumerate(taken) if t])
        self._step_counted(route, bucket, hyper, kwargs, any(taken))

    def _step_counted(self, route: Route, bucket: Bucket, hyper: dict, kwargs: dict, fused: bool) -> None:
        "Step `bucket`, its step count and running scalars advanced (in `kwargs`), fused where `fused` and ready."
        path = self.path_for(route, bucket.params[0], kwargs, bucket.sharded, fused)
        if self.state_format is not None:
            low = [bool(self.state_format.keys(route.rule, p)) for p in bucket.origins]
            if any(low):  # those params' state decoded, stepped and coded again; the others as they are
                rest = [i for i, q in enumerate(low) if not q]
                if rest: path.step(self, route, bucket.pick(rest), hyper, kwargs)
                coded = bucket.pick([i for i, q in enumerate(low) if q])
                fused = path is paths.FUSED and paths.CODED_FUSED.takes(self, route, coded, kwargs)
                path, bucket = paths.CODED_FUSED if fused else paths.QUANTIZED, coded
        path.step(self, route, bucket, hyper, kwargs)

    def as_fastai(self, p) -> bool:
        "Whether params like `p` are stepped by fastai's own steppers: 16 bits, rounded to nearest."
        return self.steppers is not None and self.rounding.mode == 'nearest' and is_low_precision(p.dtype)

    def keeps_comp(self, p) -> bool:
        "Whether params like `p` have a Kahan buffer here: 16 bits, Kahan summation."
        return self.rounding.kahan and self.rounding.in_float32(p)

    @staticmethod
    def count_step(rule: StepRule, bucket: Bucket) -> dict:
        "For a rule that counts steps: the bucket's params' step count, advanced in their states, as `step`."
        if not rule.counts_steps: return {}
        step = bucket.states[0].get('step', 0) + 1
        for state in bucket.states: state['step'] = step
        return {'step': step}

    @staticmethod
    def _advance_scalars(rule: StepRule, bucket: Bucket, kwargs: dict) -> dict:
        "The rule's running scalars for this step (see `rules.Scalars`), stored in the bucket's states."
        scalars = rule.scalars
        new = scalars.advance(**{k: bucket.states[0].get(k, v) for k, v in scalars.initial.items()}, **kwargs)
        for state in bucket.states: state.update(new)
        return new

    @staticmethod
    def store(rule: StepRule, chunk: Bucket, out) -> None:
        """Put a step's per-param values into the state: state tensors of sharded params that the step moved
        (a fused step's pack) as DTensors around their new local shards, other values as they are."""
        for key, values in (out or {}).items():
            if chunk.sharded and (key in rule.state_keys or key == COMP):
                values = [wrap_like(v, p) for v, p in zip(values, chunk.origins)]
            for state, value in zip(chunk.states, values): state[key] = value

    # --- state ---------------------------------------------------------------------------------------
    def route_of(self, p, state: dict) -> Route:
        "The route that steps `p`, whose keys its `state` holds."
        return next(r for r in self.routes if r.takes is None or r.takes(p, state))

    def check_state(self, groups, states, hypers: list) -> None:
        """Raise `ValueError` saying which group, param and key of a saved state does not fit: `groups` are the
        param lists, `states` the saved per-param states in their order, `hypers` the saved groups' hypers."""
        for i, hyper in enumerate(hypers):
            missing = [h for route in self.routes for h in route.rule.hypers if h not in hyper]
            if missing: raise ValueError(f"Invalid state dict: param group {i} lacks hypers {sorted(set(missing))}")
            for k, v in hyper.items(): check_hyper(k, v, self.checks, f" in the state dict's param group {i}")
        states = iter(states)
        for gi, pg in enumerate(groups):
            for pi, p in enumerate(pg):
                state = next(states)
                where = f"param group {gi}, param {pi} (shape {tuple(p.shape)})"
                if not isinstance(state, dict): raise ValueError(f"Invalid state dict: {where}: state is not a dict")
                check_param_state(self.route_of(p, state).rule, p, state, where)

    def load_state(self, p, state: dict) -> dict:
        "A checked saved `state` as `p`'s (see `state.load_param_state`)."
        return load_param_state(self.route_of(p, state).rule, p, state, self.rounding, self.state_format)

    def plain_state(self, p, state: dict) -> dict:
        "`p`'s `state` with any state kept in few bits decoded, in fastai's layout (see `lowbit.plain_state`)."
        return plain_state(self.route_of(p, state).rule, p, state)
