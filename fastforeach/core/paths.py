"""The ways a bucket is stepped, behind one protocol: `path.step(core, route, bucket, hyper, kwargs)`.

`Core.path_for` picks one per bucket:

- `ACCUMULATE`: optimizer accumulation is on (see `accumulation.py`): the gradients folded into the
  averages, the params moved on the last micro-batch only;
- `NEAREST`: 16-bit params with `rounding='nearest'` and the steppers of the optimizer's fastai
  equivalent: fastai's own steps, one param at a time, bit for bit;
- `FUSED`: the route's fused step, when it is ready for these params and hypers;
- `FLOAT32`: 16-bit params stepped on float32 working copies, written back as `rounding` says;
- `FOREACH`: the rule on the params as they are, after weight decay;
- `QUANTIZED`: params whose state is kept in few bits (see `lowbit.py`), as `FOREACH` or `FLOAT32` on
  their state decoded chunk by chunk;
- `CODED_FUSED`: the same params, where `FUSED` was picked and the route's compiled update is elementwise,
  decoded, stepped and coded again in one compiled pass (see `fused/coded.py`).

The last four run after the bucket's step count and running scalars have advanced (`kwargs` has them).
"""
from __future__ import annotations

import torch

from ..accumulation import fold
from ..distributed import WholeTensors, local
from ..fused import Context
from ..fused.coded import coded_formats, coded_ready, elementwise, one_row_pieces, run_coded
from ..lowbit import CODES, SCALE
from ..ops import mul_scalar_
from .buckets import Bucket
from .state import new_state, state_dtype, state_lists

__all__ = ['ACCUMULATE', 'NEAREST', 'FUSED', 'FLOAT32', 'FOREACH', 'QUANTIZED', 'CODED_FUSED', 'weight_decay']

# On CPU a foreach op is a loop over tensors, so a rule of N ops streams the whole model through memory
# N times. Cutting a bucket into chunks that fit in cache makes the N ops reuse what the first one
# loaded; on GPU one launch over everything is best.
CPU_CHUNK_BYTES = 1 << 20
# 16-bit params stepped on float32 working copies are stepped in runs of at most this many bytes (of the
# params) on a GPU too, so that the copies stay small beside the model.
FLOAT32_CHUNK_BYTES = 64 << 20


def chunk_bytes(route, bucket: Bucket, in_float32: bool) -> int | None:
    "Bytes of params per run of the rule over `bucket` (see `CPU_CHUNK_BYTES`), or None: all of it at once."
    # Sharded buckets stay whole: a rule that needs norms then all-reduces once per bucket.
    if bucket.sharded or route.rule.unchunked: return None
    if bucket.params[0].device.type == 'cpu': return CPU_CHUNK_BYTES
    return FLOAT32_CHUNK_BYTES if in_float32 else None


def takes_wd(states) -> list[bool]:
    "Whether each param takes weight decay: unless its state says `do_wd=False` (fastai's Learner's flag for norms and biases)."
    return [state.get('do_wd', True) for state in states]


def weight_decay(core, rule, chunk: Bucket, hyper: dict) -> dict:
    """Weight decay of the chunk's params whose `do_wd` is not False. A rule that does its decoupled decay
    itself (see `rules.py`) is given it instead: the `decay` keyword this returns."""
    lr, wd = hyper['lr'], hyper.get('wd', 0.)
    if rule.decays and core.decouple_wd:
        return {'decay': [wd if takes else 0. for takes in takes_wd(chunk.states)]}
    if wd == 0: return {}
    idx = [i for i, takes in enumerate(takes_wd(chunk.states)) if takes]
    if not idx: return {}
    params = [chunk.params[i] for i in idx]
    if core.decouple_wd: mul_scalar_(params, 1 - lr * wd)
    elif core.l2_into_grads: torch._foreach_add_([chunk.grads[i] for i in idx], params, alpha=wd)
    else:  # into new tensors, the gradients left as they were
        for i, g in zip(idx, torch._foreach_add([chunk.grads[i] for i in idx], params, alpha=wd)): chunk.grads[i] = g
    return {}


def compensations(rounding, bucket: Bucket) -> list | None:
    "The bucket's Kahan buffers (created on a first step; None unless Kahan), as local shards where it is sharded."
    comps = rounding.compensations(bucket.origins, bucket.states)
    return [local(c) for c in comps] if comps is not None and bucket.sharded else comps


def run_rule(rule, chunk: Bucket, kwargs: dict, states: list):
    "The rule on the chunk, with what it asks of the core besides its hypers (norms, whole tensors)."
    if rule.uses_norms: kwargs = {**kwargs, 'norms': chunk.norms}
    if rule.uses_whole: kwargs = {**kwargs, 'whole': WholeTensors(chunk.origins)}
    return rule.fn(chunk.params, chunk.grads, *states, **kwargs)


class Foreach:
    "The rule on the params as they are, in cache-sized chunks on CPU, after weight decay."
    name = 'foreach'
    in_float32 = False

    def step(self, core, route, bucket, hyper, kwargs):
        for chunk in bucket.chunks(chunk_bytes(route, bucket, self.in_float32)):
            self.step_chunk(core, route.rule, chunk, hyper, kwargs, state_lists(route.rule, chunk, core.rounding))

    @staticmethod
    def step_chunk(core, rule, chunk: Bucket, hyper: dict, kwargs: dict, states: list) -> None:
        "Step `chunk` with `states`, the rule's state lists for it."
        core.store(rule, chunk, run_rule(rule, chunk, {**kwargs, **weight_decay(core, rule, chunk, hyper)}, states))


class Float32(Foreach):
    """Weight decay and the rule on float32 copies of 16-bit params (with their Kahan buffers added),
    gradients and state; then the state written back (stochastically rounded: see `precision.py`) and the
    params as `rounding` says. The gradients are left as they were (L2 goes into the copies)."""
    name = 'float32'
    in_float32 = True

    @staticmethod
    def step_chunk(core, rule, chunk: Bucket, hyper: dict, kwargs: dict, states: list) -> None:
        rounding = core.rounding
        comps = compensations(rounding, chunk)
        work = Bucket(rounding.working(chunk.params, comps), [g.float() for g in chunk.grads], chunk.states,
                      norms=chunk.norms)
        states32 = [[t.float() for t in xs] for xs in states]
        out = run_rule(rule, work, {**kwargs, **weight_decay(core, rule, work, hyper)}, states32)
        for xs, ys in zip(states, states32): rounding.write_state(xs, ys, work.params)
        rounding.write_back(chunk.params, work.params, comps)
        core.store(rule, chunk, out)


class Quantized:
    """State kept in few bits (see `lowbit.py`): each chunk's state decoded, the chunk stepped as `FOREACH`
    steps it (`FLOAT32` for 16-bit params), its state encoded back. Chunks of at most `FLOAT32_CHUNK_BYTES`
    on a GPU too: the decoded state of the whole model is never held at once. Sharded params' state too
    (`CODED_FUSED` takes whole params only): their shards' codes, the blocks they share completed across ranks."""
    name = 'quantized'

    def step(self, core, route, bucket, hyper, kwargs):
        rule, formats = route.rule, core.state_format
        inner = FLOAT32 if core.rounding.in_float32(bucket.params[0]) else FOREACH
        def full(key, p): return new_state(rule, key, p, core.rounding)
        for chunk in bucket.chunks(chunk_bytes(route, bucket, True)):
            states, coded = formats.decoded(rule, chunk.params, chunk.states, full, chunk.origins)
            inner.step_chunk(core, rule, chunk, hyper, kwargs, states)
            formats.encode(coded)


class CodedFused:
    """Few-bit state stepped by the route's compiled elementwise update, decoded and coded again in its loop:
    one pass over each param (see `fused/coded.py`)."""
    name = 'coded-fused'

    @staticmethod
    def takes(core, route, bucket: Bucket, kwargs: dict) -> bool:
        "Whether this path steps `bucket`: an elementwise update, formats a compiled loop codes, dense tensors."
        step, p0 = elementwise(route.fused), bucket.params[0]
        formats = None if step is None or bucket.sharded else coded_formats(core.state_format, route.rule, bucket.params)
        if formats is None: return False
        # The loop's pieces alias each tensor's storage as rows: dense tensors only (a first step makes its state so).
        held = (t for state in bucket.states for t in state.values() if isinstance(t, torch.Tensor))
        if not all(t.is_contiguous() for t in (*bucket.params, *bucket.grads, *held)): return False
        rule, in_float32 = route.rule, core.rounding.in_float32(p0)
        dtypes = tuple(state_dtype(rule, key, p0, core.rounding) for key in rule.state_keys)
        return coded_ready(step, formats, core.state_format.rounding == 'stochastic', p0, kwargs, dtypes,
                           core.rounding if in_float32 else None, one_row_pieces(formats, bucket.params))

    def step(self, core, route, bucket, hyper, kwargs):
        rule, p0 = route.rule, bucket.params[0]
        formats = coded_formats(core.state_format, rule, bucket.params)
        for p, state in zip(bucket.origins, bucket.states):  # a first step's state: zeros
            for key, fmt in zip(rule.state_keys, formats):
                if fmt is None and key not in state: state[key] = new_state(rule, key, p, core.rounding)
                elif fmt is not None and key + CODES not in state: state[key + CODES], state[key + SCALE] = fmt[0].zeros(p)
        rounding = core.rounding if core.rounding.in_float32(p0) else None
        run_coded(elementwise(route.fused), formats, core.state_format.rounding == 'stochastic', rule, bucket.params,
                  bucket.grads, bucket.states, takes_wd(bucket.states), kwargs, wd=hyper.get('wd', 0.),
                  decouple_wd=core.decouple_wd, comps=compensations(core.rounding, bucket) if rounding else None,
                  rounding=rounding)


class Fused:
    "The route's fused step over the whole bucket, weight decay included (see `fused/`)."
    name = 'fused'

    def step(self, core, route, bucket, hyper, kwargs):
        in_float32 = core.rounding.in_float32(bucket.params[0])
        do_wd = takes_wd(bucket.states)
        comps = compensations(core.rounding, bucket) if in_float32 else None
        context = Context(norms=bucket.norms, sizes=[p.numel() for p in bucket.origins] if bucket.sharded else None,
                          rounding=core.rounding if in_float32 else None, comps=comps)
        states = state_lists(route.rule, bucket, core.rounding)
        core.store(route.rule, bucket, route.fused.run(bucket.params, bucket.grads, states, do_wd, kwargs,
                                                       wd=hyper.get('wd', 0.), decouple_wd=core.decouple_wd,
                                                       plans=core.plans, context=context))


class Nearest:
    "fastai's step, one param at a time: every stepper's result merged into the param's state, as fastai does."
    name = 'nearest'

    def step(self, core, route, bucket, hyper, kwargs):
        for p, state in zip(bucket.origins, bucket.states):
            for stepper in core.steppers:
                new = stepper(p, **{**state, **hyper})
                if isinstance(new, dict): state.update(new)


class Accumulate:
    """Micro-batch `index` of `n` (`core.accumulation`): L2 and the gradients folded into the averages; on the
    last, the step counted, decoupled weight decay and the rule's move of the params."""
    name = 'accumulate'

    def step(self, core, route, bucket, hyper, kwargs):
        rule, (index, n) = route.rule, core.accumulation
        acc, last = rule.accumulation, index == n - 1
        if core.rounding.in_float32(bucket.params[0]):
            raise ValueError("Optimizer accumulation of 16-bit params is not supported (rounding='nearest' aside)")
        if last: kwargs = {**kwargs, **core.count_step(rule, bucket)}
        if rule.uses_norms: kwargs = {**kwargs, 'norms': bucket.norms}
        for chunk in bucket.chunks(chunk_bytes(route, bucket, False)):
            states = state_lists(rule, chunk, core.rounding)
            if not core.decouple_wd: weight_decay(core, rule, chunk, hyper)  # L2: into each micro-batch's gradient
            fold(acc, chunk.grads, dict(zip(rule.state_keys, states)), kwargs, index, n)
            if last:
                if core.decouple_wd: weight_decay(core, rule, chunk, hyper)
                acc.move(chunk.params, *states, **kwargs)


ACCUMULATE, NEAREST, FUSED, FLOAT32, FOREACH, QUANTIZED = Accumulate(), Nearest(), Fused(), Float32(), Foreach(), Quantized()
CODED_FUSED = CodedFused()
