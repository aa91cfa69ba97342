"""Compiling per-tensor updates once per process, and calling them on chunks of tensors or on packs."""
from __future__ import annotations

import inspect
import types
import warnings
from typing import Callable

import torch

from ..precision import BUFFERED, SEEDED, kahan_split, master_value, state_value, stochastic_round
from .coefficients import DECAY_FACTORS

__all__ = ['CHUNK', 'WARMUP_SIZE', 'PLAIN', 'DECAY', 'FLAT', 'chunked', 'coefficient_dtype', 'compiles', 'flat_compiles',
           'run_chunks', 'run_flat', 'compile_cache_info']

# Tensors per call of a compiled update: larger chunks mean fewer Python calls per step, but a longer
# first compile (each tensor of a chunk is its own loop in the generated code).
CHUNK = 8
WARMUP_SIZE = 1 << 16


# How a compiled update is called (see `_runner`).
PLAIN, DECAY, FLAT = 'plain', 'decay', 'flat'


def _runner(update: Callable, mode: str, rounding: str | None = None, writes: bool = True, first: bool = True):
    """`run(lists, c)`: `update(*tensors, c)` on the i-th tensor of every list, for each i.

    With FLAT, `run(tensors, c)` is `update(*tensors, c)`: whole tensors, not lists.

    With DECAY, the lists are (params, grads, *states) and weight decay comes first, from the decay factors
    at the head of `c` (see `coefficients.py`): the decoupled factor (1 − lr·wd, or 1) and the L2 factor (wd,
    or 0). Every update gets the whole `c`.

    With `rounding` ('kahan', 'master24' or 'stochastic', for 16-bit params: see `precision.py`), the update
    works on float32 copies of its tensors, the param's with its buffer (the list after the tensors') added,
    and with a seed for the noise of a random rounding (the last list, see `hashed_bits`): the `first` phase of a step
    (lists: params, grads, *states) writes the state back (16-bit state stochastically rounded with noise
    hashed from its data, `precision.hashed_noise`, in both modes), the phase that `writes` the param
    writes it and its buffer back, in the same pass: each 16-bit tensor read once and written once. (A
    later phase gets params, *states, *what the first returned; it only reads the state.)"""
    if mode == FLAT: return lambda tensors, c: update(*tensors, c)

    def run(lists, c):
        out = []
        for i in range(len(lists[0])):
            tensors = [xs[i] for xs in lists]
            if rounding is not None:
                seed = tensors.pop() if rounding in SEEDED else None
                comp = tensors.pop() if rounding in BUFFERED else None
                p, originals = tensors[0], tensors
                tensors = [master_value(p, comp) if comp is not None else p.float(), *(t.float() for t in tensors[1:])]
            if mode == DECAY:
                w, g = tensors[0], tensors[1]
                tensors[1] = g + c[_L2] * w
                w.mul_(c[_DECAY])
                out.append(update(*tensors, c))
            else: out.append(update(*tensors, c))
            if rounding is not None and first:
                for t, t32 in zip(originals[2:], tensors[2:]): t.copy_(state_value(t32, t.dtype, tensors[0]))
            if rounding is not None and writes:
                w = tensors[0]
                noise = hashed_bits(w, seed + i * _GOLDEN) if seed is not None else None
                if comp is not None:  # a 24-bit master's low byte rounded with 8 bits of the noise
                    p_new, comp_new = kahan_split(w, p.dtype, comp.dtype, None if noise is None else noise & 255)
                    comp.copy_(comp_new)
                    p.copy_(p_new)
                else: p.copy_(stochastic_round(w, p.dtype, noise))
        return out
    return run


_DECAY, _L2 = range(len(DECAY_FACTORS))  # their places in every coefficient vector
_GOLDEN = 0x9E3779B9  # seeds of the tensors of one call, far apart


def hashed_bits(like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """16 random bits per element of `like` (in its shape), from a hash of each flat index and `seed` (a 0-d
    tensor; a murmur3 finaliser in int64 arithmetic kept to 32 bits): inside a compiled loop, several times
    faster than a random number generator on CPU (stochastic rounding of 4M elements, 2 threads: 3 ms,
    against 17 ms with `randint`)."""
    mask = 0xFFFFFFFF
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    x = (index + seed) & mask
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & mask
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & mask
    return (x ^ (x >> 16)) & 0xFFFF


def _seeds(like: torch.Tensor, n: int) -> list[torch.Tensor]:
    """One fresh seed (from torch's generator for `like`'s device), as the list of `n` a chunk's call takes.
    A 0-d tensor: a one-element seed has a size of its own, left symbolic (`_size_configs`), and inductor
    then read it as if it had one element per element of the tensor it was broadcast to (seen in the 2nd
    to 8th tensors of a chunk: reads past its end, a crash or noise from whatever memory lay there)."""
    seed = torch.randint(0, 1 << 31, (), dtype=torch.int64, device=like.device)
    return [seed] * n


_COMPILED: dict[tuple, Callable] = {}
_CHECKED: dict[tuple, bool] = {}   # (updates, dtype, device type) -> whether they compiled; process-wide


def compile_cache_info() -> list[tuple]:
    "The graphs this process has compiled: (update, how it is called, dtype, device type, rounding, writes, first)."
    return [(k[0].__name__, *k[1:]) for k in _COMPILED]


def _compiled(update: Callable, mode: str, dtype: torch.dtype, device_type: str, rounding: str | None = None,
              writes: bool = True, first: bool = True) -> Callable:
    key = (update, mode, dtype, device_type, rounding, writes, first)
    if key not in _COMPILED:
        run = _runner(update, mode, rounding, writes, first)
        # A code object of its own per key: dynamo caches graphs per code object (see module docstring).
        own = types.FunctionType(run.__code__.replace(), run.__globals__, f"fused_{update.__name__}", None, run.__closure__)
        # Not fullgraph: should dynamo ever give up on a call (a recompile limit), it then runs the update
        # eagerly, slower but right, where fullgraph would raise in the middle of a step.
        # A 16-bit write-back rounds to 16 bits and keeps what rounding took off: inductor must not fold the
        # round trip w.to(bfloat16).float() into w (its default), or nothing would be kept.
        options = {'emulate_precision_casts': True} if rounding is not None else {}
        options.update(getattr(update, 'inductor_options', {}))
        _COMPILED[key] = torch.compile(own, dynamic=True, options=options or None)
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


def compiles(phases: tuple, like: torch.Tensor, n_lists: int, n_coefficients: int, chunk: int = CHUNK,
             rounding: str | None = None, dtypes: tuple | None = None) -> bool:
    """Compile (or find compiled) the `phases` of a step (see `run_chunks`) for `like`'s dtype and device
    (each list's dtype in `dtypes` when they differ), on dummy tensors, before any real tensor is touched.
    On failure, warn once and return False: the caller steps with its foreach form."""
    dtypes = dtypes or (like.dtype,) * n_lists
    def attempt():
        lists = [[_warmup(like, dtype=dtype) for _ in range(chunk)] for dtype in dtypes]
        run_chunks(phases, [lists], _warmup(like, n_coefficients, coefficient_dtype(like.dtype)), chunk, rounding)
    return _compiles((phases, dtypes, like.device.type, chunk, rounding), [update for update, _ in phases], like,
                     attempt)


def flat_compiles(phase: tuple, like: torch.Tensor, n_coefficients: int, dtypes: tuple | None = None,
                  rounding: str | None = None, comp_dtype: torch.dtype | None = None) -> bool:
    """`compiles` for a phase of a `PackStep`: (update, how many of its tensors are spread values, whether it
    writes the params); `dtypes`, when given, those of the pack's flat tensors, one per tensor before the
    spread values; `rounding` and `comp_dtype` as `run_flat` takes them."""
    update, n_spread, writes = phase
    n_flat = len(inspect.signature(update).parameters) - 1 - n_spread  # all but the spread values and c
    dtypes = dtypes[:n_flat] if dtypes else (like.dtype,) * n_flat
    def attempt():
        spread = [_warmup(like, dtype=coefficient_dtype(like.dtype)) for _ in range(n_spread)]
        comps = [_warmup(like, dtype=comp_dtype)] if rounding in BUFFERED else []
        run_flat(update, [*(_warmup(like, dtype=dtype) for dtype in dtypes), *spread, *comps],
                 _warmup(like, n_coefficients, coefficient_dtype(like.dtype)), rounding, writes)
    return _compiles((phase, dtypes, like.device.type, rounding, comp_dtype), [update], like, attempt)


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


def run_chunks(phases: tuple, chunks: list, c: torch.Tensor, n: int, rounding: str | None = None) -> list:
    """The compiled `phases`, `((update, mode), ...)`, over every chunk; what the last returned for the
    first `n` (real, not padding) tensors.

    A second phase gets the chunk's params and state (not the gradients) followed by what the first
    returned per tensor (lists of 0-d tensors): LAMB's norms, which must be known before its update.

    With `rounding` (see `_runner`), every phase works on the params' float32 working values and the last
    writes them back; with a buffer ('kahan', 'master24') the chunk's last list is the buffers, handed to every
    phase after the tensors."""
    like, last = chunks[0][0][0], len(phases) - 1
    fns = [_compiled(update, mode, like.dtype, like.device.type, rounding, i == last, i == 0)
           for i, (update, mode) in enumerate(phases)]
    out = []
    for chunk in chunks:
        comps = chunk[-1:] if rounding in BUFFERED else []
        chunk = chunk[:-1] if comps else chunk
        seeds = [_seeds(like, len(chunk[0]))] if rounding in SEEDED else []
        res = fns[0]([*chunk, *comps, *seeds], c)
        for fn in fns[1:]: res = fn([chunk[0], *chunk[2:], *map(list, zip(*res)), *comps, *seeds], c)
        out += res
    return out[:n]


def run_flat(update: Callable, tensors: list[torch.Tensor], c: torch.Tensor, rounding: str | None = None,
             writes: bool = True):
    """The compiled `update(*tensors, c)` on whole tensors (a pack's): what it returns. With `rounding` (see
    `_runner`), on float32 values of them, written back (the params only if the phase `writes` them; with
    a buffer, `tensors` ends with it)."""
    like = tensors[0]
    if rounding is None: return _compiled(update, FLAT, like.dtype, like.device.type)(tensors, c)
    seeds = [_seeds(like, 1)] if rounding in SEEDED else []
    return _compiled(update, PLAIN, like.dtype, like.device.type, rounding, writes)([[t] for t in tensors] + seeds, c)[0]


def _dummies(dtypes: tuple, device) -> list[list[torch.Tensor]]:
    "`CHUNK` distinct one-element tensors per list, of its dtype: padding that lets one graph serve chunks of any length."
    key = (dtypes, device)
    if key not in _DUMMIES:
        _DUMMIES[key] = [[torch.zeros(1, dtype=dtype, device=device) for _ in range(CHUNK)] for dtype in dtypes]
    return _DUMMIES[key]


_DUMMIES: dict = {}


def chunked(lists: list[list[torch.Tensor]], size: int = CHUNK) -> list[list[list[torch.Tensor]]]:
    "Parallel lists cut into chunks of `size` (at most `CHUNK`) tensors, the last one padded with dummies."
    n, like = len(lists[0]), lists[0][0]
    pad = -n % size
    padded = [xs + d[:pad] for xs, d in zip(lists, _dummies(tuple(xs[0].dtype for xs in lists), like.device))]
    return [[xs[s:s + size] for xs in padded] for s in range(0, n + pad, size)]
