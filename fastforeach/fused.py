"""Fused steps: one pass over memory per param per step.

A foreach rule is a chain of list ops, each of which reads and writes every tensor. Its fused form does
the same math in one pass, in one of two ways:

- `KernelStep`: PyTorch ships a multi-tensor kernel whose math equals the rule (SGD, Adam, AdamW).
- `CompiledStep`: the optimizer's *per-tensor update*, compiled by `torch.compile` (inductor: one C++/OpenMP
  loop per tensor on CPU, Triton on GPU) and called on lists of `CHUNK` tensors at once (or fewer: `chunk`).

How a compiled step avoids recompiling:
- hypers and the step count never enter the graph as Python numbers: the rule's `coefficients` turns them
  into one small tensor per step (computed in float64 from Python floats, as fastai does), so a schedule
  that changes lr and mom every batch runs the same graph;
- every tensor is seen as a flat 1-d alias of its storage, with dynamic sizes, so one graph serves every
  shape: compiling happens once per (update, dtype, device) for the process, whatever the model;
- each graph gets its own code object, so dynamo keeps one graph per cache and its recompile limit never
  bites.

A compiled loop per tensor costs several microseconds however small the tensor, which on a model of many
small tensors is most of the step. An elementwise update gives the same result on tensors laid end to end
as on each, so small tensors are stepped as one `Pack`: their state lives end to end for good, and a step
copies params and gradients in and params back out (under a microsecond per tensor each). An update that
needs each tensor's norms (Larc, LAMB) steps a pack in phases around them (`PackStep`).

When compiling fails (no C++ compiler, an unsupported device), the step warns once and runs its foreach
rule instead; the check runs on dummy tensors before a step touches anything, and tries a second way of
tracing sizes first (`_size_configs`).
"""
from __future__ import annotations

import inspect
import itertools
import math
import operator
import types
import warnings
from functools import cached_property
from typing import Callable, NamedTuple

import torch

from .distributed import LOCAL_NORMS, WholeNorms
from .ops import device_tensor, mul_scalar_

__all__ = ['FusedStep', 'KernelStep', 'EitherStep', 'CompiledStep', 'Operands', 'Pack', 'PackStep', 'Plans', 'CHUNK',
           'chunked', 'coefficient_dtype', 'compiles', 'flat_compiles', 'is_dense', 'run_chunks', 'run_flat',
           'flat_alias', 'end_to_end', 'compile_cache_info']

# Tensors per call of a compiled update: larger chunks mean fewer Python calls per step, but a longer
# first compile (each tensor of a chunk is its own loop in the generated code).
CHUNK = 8
WARMUP_SIZE = 1 << 16
COMPILED_MIN_NUMEL = 1 << 14
# Params of at most this many elements, per device type, are stepped as one `Pack` by compiled updates.
# CPU: a compiled loop per tensor costs 5-7 µs below it, copying in and out 3-6 µs (RAdam, 2 threads; about
# even at 16K elements). CUDA: a kernel launch per tensor costs more than copying all but the largest in
# and out, so the larger the packs the faster (H100, xresnet50 RMSProp: 4.2 ms per step packing up to 8K
# elements, 2.2 ms up to 1M, 1.7 ms up to 8M, which packs every param). A pack holds a copy of its params
# and gradients, so larger tensors, which gain little, are stepped one by one.
PACK_MAX_NUMEL = {'cpu': 1 << 13, 'cuda': 1 << 23}


def pack_max_numel(device: torch.device) -> int:
    "The largest param `device` steps in a `Pack` (other devices: as the CPU)."
    return PACK_MAX_NUMEL.get(device.type, PACK_MAX_NUMEL['cpu'])


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


# --- compiled steps ---------------------------------------------------------------------------------

def is_dense(t: torch.Tensor) -> bool:
    "Whether `t`'s elements fill one block of storage, in some order of its dims (contiguous, channels last…)."
    if t.is_contiguous(): return True
    expected = 1
    for d in sorted(range(t.ndim), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected: return False
        expected *= t.size(d)
    return True


def flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor over the storage of dense `t`, made with `set_` rather than `view`: dynamo guards on a
    view's base, whose shape differs from param to param, and would recompile for each."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _identity(t): return t


class Operands:
    """A param, its gradient and its state, laid out element for element alike, as fused kernels need them
    (PyTorch's walk memory in order) and as flat aliases of them presume.

    A param that is not dense, or a gradient or state tensor whose strides differ from the param's, is
    copied into a dense tensor laid out like the param; copies of the param and state are written back
    after the step (`write_back`). `alias` maps each tensor handed out (identity, or `flat_alias`)."""
    __slots__ = ('p', 'g', 'states', 'back', 'alias')

    def __init__(self, p, g, states, alias: Callable = _identity):
        self.back, self.alias = [], alias
        dense = is_dense(p)
        self.p = alias(p) if dense else self._copy(p, None, back=True)
        like = p if dense else None
        self.g = alias(g) if dense and g.stride() == p.stride() else self._copy(g, like, back=False)
        self.states = [alias(s) if dense and s.stride() == p.stride() else self._copy(s, like, back=True)
                       for s in states]

    def _copy(self, t, like, back):
        work = torch.empty_like(like) if like is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        work.copy_(t)
        if back: self.back.append((t, work))
        return self.alias(work)

    def write_back(self):
        for t, work in self.back: t.copy_(work)

    @classmethod
    def of(cls, params, grads, states, idx, alias=_identity):
        "`(lists, ops)`: the (params, grads, *states) lists of the params at `idx`, and their operands."
        ops = [cls(params[i], grads[i], [s[i] for s in states], alias) for i in idx]
        return [[o.p for o in ops], [o.g for o in ops], *([o.states[k] for o in ops] for k in range(len(states)))], ops


def end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-d alias over `tensors` when each is contiguous and each starts where the one before ends, in one
    storage (as views of one buffer do); else None. Empty tensors hold nothing and may lie anywhere."""
    held = [t for t in tensors if t.numel()]
    if not held: return torch.empty(0, dtype=tensors[0].dtype, device=tensors[0].device)
    first = held[0]
    storage, size, at = first.untyped_storage(), first.element_size(), first.data_ptr()
    for t in held:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() or t.data_ptr() != at
                or t.untyped_storage().data_ptr() != storage.data_ptr()):
            return None
        at += t.numel() * size
    n = (at - first.data_ptr()) // size
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, first.storage_offset(), (n,), (1,))


def _laid_end_to_end(like: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    "A new buffer, and views of it shaped like each of `like` (contiguous), one after the other."
    flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
    return flat, [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like)]


class Pack:
    """Small params stepped as one flat tensor by a compiled update.

    Their state lives end to end for good, each state tensor a view of one buffer per key; each step copies
    the params and this step's gradients into buffers of their own (`copy_in`) and the params back
    (`copy_out`), so the pack holds while params and state do, whatever becomes of the gradients. State
    not laid out so (new, loaded from a state dict, replaced by hand) is moved into a new buffer when the
    pack is made: `moved[k]` holds the views to store in its place, or None where state key k stayed."""
    __slots__ = ('params', 'flat_p', 'p_views', 'flat_g', 'g_views', 'flat_states', 'moved', '_cached')

    def __init__(self, params, states):
        self.params = params
        self.flat_p, self.p_views = _laid_end_to_end(params)
        self.flat_g, self.g_views = _laid_end_to_end(params)
        self.flat_states, self.moved = [], []
        for ss in states:
            flat, views = end_to_end(ss), None
            if flat is None or flat.dtype != self.flat_p.dtype or flat.device != self.flat_p.device:
                flat, views = _laid_end_to_end(params)
                torch._foreach_copy_(views, ss)
            self.flat_states.append(flat)
            self.moved.append(views)
        self._cached = {}

    @property
    def lists(self) -> list[list[torch.Tensor]]:
        "(params, grads, *states), each a list of one flat tensor, as compiled updates take them."
        return [[self.flat_p], [self.flat_g], *([s] for s in self.flat_states)]

    def copy_in(self, grads):
        torch._foreach_copy_(self.p_views, self.params)
        torch._foreach_copy_(self.g_views, grads)

    def copy_out(self): torch._foreach_copy_(self.params, self.p_views)

    def _once(self, key, make):
        if key not in self._cached: self._cached[key] = make()
        return self._cached[key]

    @property
    def _runs(self) -> list[tuple[int, int]]:
        "(how many, elements each) of every run of params of the same size, in order (see `Plans.pack`)."
        return self._once('runs', lambda: [(len(list(run)), n) for n, run in
                                           itertools.groupby(p.numel() for p in self.params)])

    def norms(self, *flats: torch.Tensor, whole: WholeNorms = LOCAL_NORMS) -> tuple[torch.Tensor, ...]:
        """For each of `flats` (the pack's params, gradients…), the L2 norm of each param's stretch as a 1-d
        tensor: one reduction per run of params of the same size, not one per param; completed by `whole`
        to the norms of whole params where the pack holds shards of them (one all-reduce for all `flats`)."""
        def of(flat):
            rows, at = [], 0
            for k, n in self._runs:
                rows.append(torch.linalg.vector_norm(flat[at:at + k * n].view(k, n), dim=1))
                at += k * n
            return torch.cat(rows) if len(rows) > 1 else rows[0]
        local = torch.stack([of(flat) for flat in flats]).to(coefficient_dtype(flats[0].dtype))
        return tuple(whole.complete(local))

    def per_param(self, key: str, values: torch.Tensor) -> list[torch.Tensor]:
        """`values` (1-d, one per param) as one 0-d tensor per param, to store in the state: views of a buffer
        the pack keeps under `key`, the same tensors every step, each step's values written into them.
        (Unbinding anew makes a tensor per param per step: 0.1 ms a step on a 200-param pack.)"""
        def buffer_and_views():
            buffer = torch.empty_like(values)
            return buffer, buffer.unbind()
        buffer, views = self._once(('per_param', key), buffer_and_views)
        buffer.copy_(values)
        return views

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """One value per param written over each of its elements: a flat tensor the size of the pack, one
        broadcast copy per run of equal sizes. (Read as `values[segments]` inside a compiled loop, an index
        per element kept inductor from vectorising it: 3x slower on the MLP.) Its buffer is reused by the
        next call."""
        out = self._once('spread', lambda: torch.empty(self.flat_p.numel(), dtype=values.dtype, device=values.device))
        at = first = 0
        for k, n in self._runs:
            out[at:at + k * n].view(k, n).copy_(values[first:first + k, None])
            at, first = at + k * n, first + k
        return out


def _dummies(dtype, device, n_lists: int) -> list[list[torch.Tensor]]:
    "`CHUNK` distinct one-element tensors per list: padding that lets one graph serve chunks of any length."
    key = (dtype, device, n_lists)
    if key not in _DUMMIES:
        _DUMMIES[key] = [[torch.zeros(1, dtype=dtype, device=device) for _ in range(CHUNK)] for _ in range(n_lists)]
    return _DUMMIES[key]


_DUMMIES: dict = {}


def chunked(lists: list[list[torch.Tensor]], size: int = CHUNK) -> list[list[list[torch.Tensor]]]:
    "Parallel lists cut into chunks of `size` (at most `CHUNK`) tensors, the last one padded with dummies."
    n, like = len(lists[0]), lists[0][0]
    pad = -n % size
    padded = [xs + d[:pad] for xs, d in zip(lists, _dummies(like.dtype, like.device, len(lists)))]
    return [[xs[s:s + size] for xs in padded] for s in range(0, n + pad, size)]


class Plans:
    """The operands of each call site's last step, reused while the same tensors come back with the same
    storage (fastai keeps its gradient tensors between steps; the state is ours).

    Building them costs a few microseconds per tensor, which on a model of many small tensors is more
    than the fused arithmetic."""
    def __init__(self):
        self._plans = {}

    def __getstate__(self):
        "A copy (pickle, deepcopy) starts with no plans: the cached operands alias the original's tensors."
        return {'_plans': {}}

    def get(self, key, tensors: list, build: Callable):
        "`(operands, ops)`: the cached operands and no ops, or `build()`'s, cached when no op needs copying back."
        ptrs = list(map(torch.Tensor.data_ptr, tensors))
        plan = self._plans.get(key)
        if plan is not None and plan[1] == ptrs and all(map(operator.is_, plan[0], tensors)):
            return plan[2], ()
        operands, ops = build()
        if any(o.back for o in ops): self._plans.pop(key, None)
        else: self._plans[key] = (tensors, ptrs, operands)
        return operands, ops

    def operands(self, owner, params, grads, states, idx, alias=_identity):
        "`Operands.of(params, grads, states, idx, alias)` for `owner`, from the last step's when they still hold."
        lists = (params, grads, *states)
        if len(idx) < len(params): lists = [[xs[i] for i in idx] for xs in lists]  # else idx is every index
        tensors = list(itertools.chain.from_iterable(lists))
        return self.get((owner, id(params[idx[0]])), tensors, lambda: Operands.of(params, grads, states, idx, alias))

    def pack(self, owner, params, states, idx) -> Pack:
        """The `Pack` of the params at `idx` for `owner`, the last step's while the same params and state come
        back. `idx` should be sorted by size, so that params of one size lie together (see `Pack.norms`)."""
        sub = [[xs[i] for i in idx] for xs in (params, *states)]
        tensors = [t for xs in sub for t in xs]
        key = (owner, 'pack', id(params[idx[0]]))
        pack = self.get(key, tensors, lambda: (Pack(sub[0], sub[1:]), ()))[0]
        # Moved state is stored by the caller; the next step finds it in place and caches a pack over it.
        if any(v is not None for v in pack.moved): self._plans.pop(key, None)
        return pack


# How a compiled update is called (see `_runner`).
PLAIN, DECAY, FLAT = 'plain', 'decay', 'flat'


def _runner(update: Callable, mode: str):
    """`run(lists, c)`: `update(*tensors, c)` on the i-th tensor of every list, for each i.

    With FLAT, `run(tensors, c)` is `update(*tensors, c)`: whole tensors, not lists.

    With DECAY, the lists are (params, grads, *states) and weight decay comes first: `c[0]` is the
    decoupled factor (1 − lr·wd, or 1), `c[1]` the L2 factor (wd, or 0), and the update gets `c[2:]`."""
    if mode == FLAT: return lambda tensors, c: update(*tensors, c)

    def run(lists, c):
        out = []
        for i in range(len(lists[0])):
            tensors = [xs[i] for xs in lists]
            if mode == DECAY:
                p, g = tensors[0], tensors[1]
                tensors[1] = g + c[1] * p
                p.mul_(c[0])
                out.append(update(*tensors, c[2:]))
            else: out.append(update(*tensors, c))
        return out
    return run


_COMPILED: dict[tuple, Callable] = {}
_CHECKED: dict[tuple, bool] = {}   # (updates, dtype, device type) -> whether they compiled; process-wide


def compile_cache_info() -> list[tuple]:
    "The graphs this process has compiled: (update, how it is called, dtype, device type)."
    return [(k[0].__name__, *k[1:]) for k in _COMPILED]


def _compiled(update: Callable, mode: str, dtype: torch.dtype, device_type: str) -> Callable:
    key = (update, mode, dtype, device_type)
    if key not in _COMPILED:
        run = _runner(update, mode)
        # A code object of its own per key: dynamo caches graphs per code object (see module docstring).
        own = types.FunctionType(run.__code__.replace(), run.__globals__, f"fused_{update.__name__}", None, run.__closure__)
        # Not fullgraph: should dynamo ever give up on a call (a recompile limit), it then runs the update
        # eagerly, slower but right, where fullgraph would raise in the middle of a step.
        _COMPILED[key] = torch.compile(own, dynamic=True)
    return _COMPILED[key]


def _size_configs() -> tuple:
    """How sizes are traced, tried in order. Sizes stay symbolic and no two tensors are forced to share a
    size; the first also leaves sizes 0 and 1 unspecialised (one graph for every size). Older PyTorch
    (2.11) fails to lower graphs traced that way (`KeyError: 'unbacked_bindings'`), so the second
    specialises them (a 1-element tensor then gets a graph of its own)."""
    import torch.fx.experimental._config as fx_config
    return (lambda: fx_config.patch(use_duck_shape=False, backed_size_oblivious=True),
            lambda: fx_config.patch(use_duck_shape=False))


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    "float64 params get float64 coefficients; every other float gets float32, as PyTorch's scalar math does."
    return torch.float64 if dtype == torch.float64 else torch.float32


def compiles(phases: tuple, like: torch.Tensor, n_lists: int, n_coefficients: int, chunk: int = CHUNK) -> bool:
    """Compile (or find compiled) the `phases` of a step (see `run_chunks`) for `like`'s dtype and device,
    on dummy tensors, before any real tensor is touched. On failure, warn once and return False: the
    caller steps with its foreach form."""
    def attempt():
        lists = [[_warmup(like) for _ in range(chunk)] for _ in range(n_lists)]
        run_chunks(phases, [lists], _warmup(like, n_coefficients, coefficient_dtype(like.dtype)), chunk)
    return _compiles((phases, like.dtype, like.device.type, chunk), [update for update, _ in phases], like, attempt)


def flat_compiles(phase: tuple, like: torch.Tensor, n_coefficients: int) -> bool:
    "`compiles` for a phase of a `PackStep`: (update, how many of its tensors are spread values)."
    update, n_spread = phase
    def attempt():
        n_flat = len(inspect.signature(update).parameters) - 1 - n_spread  # all but the spread values and c
        spread = [_warmup(like, dtype=coefficient_dtype(like.dtype)) for _ in range(n_spread)]
        run_flat(update, [*(_warmup(like) for _ in range(n_flat)), *spread],
                 _warmup(like, n_coefficients, coefficient_dtype(like.dtype)))
    return _compiles((phase, like.dtype, like.device.type), [update], like, attempt)


def _warmup(like, size=WARMUP_SIZE, dtype=None):
    # Inductor plans loops (threads, vector width) from the sizes it first sees: large ones, as real
    # weights are, so that the kernels run on every thread.
    return torch.ones(size, dtype=dtype or like.dtype, device=like.device)


def _compiles(key, updates, like, attempt) -> bool:
    if key not in _CHECKED:
        try:
            # Under no_grad, as steps run: dynamo guards on grad mode, and would compile again for the step.
            with torch.no_grad(): _first_that_compiles(attempt)
            _CHECKED[key] = True
        except Exception as e:  # noqa: BLE001 - any failure to compile means: use the foreach form
            first_line = str(e).splitlines()[0] if str(e) else ''
            name = ' and '.join(update.__name__ for update in updates)
            warnings.warn(f"fastforeach: could not compile the fused {name} for {like.dtype} on "
                          f"{like.device.type} ({type(e).__name__}: {first_line}); using its foreach form instead",
                          RuntimeWarning, stacklevel=6)
            _CHECKED[key] = False
    return _CHECKED[key]


def _first_that_compiles(attempt):
    "Run `attempt` under the first of `_size_configs` it compiles under; raise the first failure if none."
    first = None
    for config in _size_configs():
        try:
            with config(): return attempt()
        except Exception as e:  # noqa: BLE001 - try the next way of tracing sizes
            first = first or e
    raise first


def run_chunks(phases: tuple, chunks: list, c: torch.Tensor, n: int) -> list:
    """The compiled `phases`, `((update, mode), ...)`, over every chunk; what the last returned for the
    first `n` (real, not padding) tensors.

    A second phase gets the chunk's params and state (not the gradients) followed by what the first
    returned per tensor (lists of 0-d tensors): LAMB's norms, which must be known before its update."""
    like = chunks[0][0][0]
    fns = [_compiled(update, mode, like.dtype, like.device.type) for update, mode in phases]
    out = []
    for chunk in chunks:
        res = fns[0](chunk, c)
        for fn in fns[1:]: res = fn([chunk[0], *chunk[2:], *map(list, zip(*res))], c)
        out += res
    return out[:n]


def run_flat(update: Callable, tensors: list[torch.Tensor], c: torch.Tensor):
    "The compiled `update(*tensors, c)` on whole tensors (a pack's): what it returns."
    like = tensors[0]
    return _compiled(update, FLAT, like.dtype, like.device.type)(tensors, c)


class PackStep(NamedTuple):
    """How a `Pack` is stepped by an update that reduces over each tensor (Larc's and LAMB's norms), which
    the pack cannot do in one elementwise loop: `run(pack, c, l2, norms)` runs its compiled `phases` with
    `run_flat`, and the reductions between them with `Pack.norms(..., whole=norms)`; it returns one tuple of
    values to store per param, as the update would, or None. `l2` says whether `c` carries an L2 factor
    (`c[1]`, else 0), so that a pass that only adds it can be skipped.

    Each phase is `(update, n_spread)`: `update(*flat, *spread, c)` gets tensors of the pack's size and
    dtype, then its last `n_spread` tensors in `coefficient_dtype`: per-param values spread over their
    elements by `Pack.spread`. `CompiledStep.ready` compiles every phase on dummies before a step."""
    run: Callable
    phases: tuple[tuple[Callable, int], ...]


class CompiledStep(FusedStep):
    """A rule done by its compiled per-tensor `update(p, g, *state, c)`, where `c` is the tensor of
    `coefficients(**hypers)` (the rule's hypers, and `step` when it counts steps). `update` changes `p` and
    the state in place and returns None, or a tuple of 0-d tensors stored under the state keys `returns`.

    `choose`, when given, picks the update for this step's hypers among a few (RAdam: with or without
    SAdam's softplus), so that no update pays for a branch it does not take.

    `then`, when given, is a second pass, `then(p, *state, *update's outputs, c)`, compiled apart: its
    inputs must be complete before it starts (LAMB's norms), and two graphs keep inductor from holding a
    full-size temporary between the passes. Both passes get the whole `c` and do the weight decay
    themselves, so that the param is written once, in the second.

    Params of at most `pack_max_numel` elements are stepped as one `Pack`: by the update itself when it
    returns nothing and has no second pass, which must then be elementwise (no reduction over a tensor);
    else by `pack_step`, when given.

    `chunk`: tensors per compiled call for the others. An update that reduces each tensor before it
    writes (Larc) takes 1: given several, inductor runs every tensor's reduction before any update, so
    none finds its tensor still in cache (Larc on xresnet50, CPU: 10% faster one at a time)."""
    def __init__(self, rule: Callable, update: Callable, coefficients: Callable, returns: tuple[str, ...] = (),
                 choose: Callable | None = None, then: Callable | None = None, pack_step: PackStep | None = None,
                 chunk: int = CHUNK):
        super().__init__(rule)
        self.update, self.coefficients, self.returns, self.choose, self.then = update, coefficients, returns, choose, then
        self.pack_step, self.chunk = pack_step, chunk
        self.packs = pack_step is not None or (not returns and then is None)

    def _phases(self, hypers) -> tuple:
        update = self.update if self.choose is None else self.choose(hypers)
        return ((update, PLAIN), (self.then, PLAIN)) if self.then else ((update, DECAY),)

    @cached_property
    def _state_keys(self) -> tuple[str, ...]:
        from .engine import StepRule  # the engine imports this module
        return StepRule.of(self.rule).state_keys

    @property
    def _n_lists(self) -> int: return 2 + len(self._state_keys)

    def ready(self, p, hypers) -> bool:
        n_coefficients = 2 + len(self.coefficients(**hypers))
        return (compiles(self._phases(hypers), p, self._n_lists, n_coefficients, self.chunk) and
                all(flat_compiles(phase, p, n_coefficients) for phase in self.pack_phases))

    @property
    def pack_phases(self): return self.pack_step.phases if self.pack_step else ()

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, norms=LOCAL_NORMS, sizes=None):
        phases, rule_c = self._phases(hypers), self.coefficients(**hypers)
        p0, lr = params[0], hypers['lr']
        outs, stored = [None] * len(params), {}
        # Sizes of whole params, so that shards are packed alike, in the same order, on every rank.
        numels, largest = sizes or [p.numel() for p in params], pack_max_numel(p0.device)
        # Shards of params: an update that takes norms inside its compiled loop would take the shard's, so
        # every param goes through the pack, whose norms are completed across ranks.
        if self.pack_step is not None and not norms.is_local: largest = math.inf
        for idx, takes_wd in split_by_wd(do_wd, wd):
            decay, l2 = (1 - lr * wd, 0.) if takes_wd and decouple_wd else (1., wd if takes_wd else 0.)
            c = device_tensor([decay, l2, *rule_c], coefficient_dtype(p0.dtype), p0.device)
            small = sorted((i for i in idx if numels[i] <= largest), key=numels.__getitem__) if self.packs else []
            if small:
                pack = plans.pack(self, params, states, small)
                for i, r in zip(small, self._run_pack(pack, phases, c, l2 != 0, small, grads, states, stored, norms)):
                    outs[i] = r
                idx = [i for i in idx if numels[i] > largest]
                if not idx: continue
            lists, ops = plans.operands(self, params, grads, states, idx, flat_alias)
            for i, r in zip(idx, run_chunks(phases, chunked(lists, self.chunk), c, len(idx))): outs[i] = r
            for o in ops: o.write_back()
        stored.update({key: [out[k] for out in outs] for k, key in enumerate(self.returns)})
        return stored or None

    def _run_pack(self, pack: Pack, phases, c, l2: bool, idx, grads, states, stored, norms) -> list:
        """Step `pack`, the params at `idx`; put the state it moved into `stored` (state key -> one value per
        param). What the update returns for each param (None for each when it returns nothing)."""
        pack.copy_in([grads[i] for i in idx])
        if self.pack_step: outs = self.pack_step.run(pack, c, l2, norms)
        else: outs = run_chunks(phases, chunked(pack.lists), c, 1)[0]
        pack.copy_out()
        for key, ss, views in zip(self._state_keys, states, pack.moved):
            if views is None: continue
            values = stored.setdefault(key, list(ss))
            for i, v in zip(idx, views): values[i] = v
        return outs if outs is not None else [None] * len(idx)
