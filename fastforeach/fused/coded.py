"""Few-bit state (see `lowbit.py`) stepped in one compiled pass: each block's codes decoded, the optimizer's
elementwise update run, and the block's new scale and codes written, in one loop over the param.

A param's few-bit state is codes (8 bits: shaped like it; 4 bits: two a byte, flat) and one scale per
block of its flat order. The loop takes every tensor of a param (itself, its gradient, each state's codes
or values, its Kahan buffer) in two pieces: its whole blocks as rows, and its last short block, if any, as
one row; a block's scale is then a reduction over its row, which inductor runs beside the update in the
same loop, and scales are a column. Pieces are stepped `CODED_CHUNK` to a call; pieces of one row are
called apart (dynamo guards on a size of 1, which broadcasts).

Only for rules whose compiled update is elementwise (`elementwise`): an update that needs a norm of its
tensor (Larc, LAMB, StableAdam) would take it over a piece. Those, and keys kept in formats of two block
sizes, step by decoding cache-sized chunks (`QUANTIZED` in `core/paths.py`).

Codes to nearest equal the eager coder's, bit for bit; stochastic codes are drawn with noise hashed from
the new state and the new param (`precision.hashed_noise`), as 16-bit state is rounded: a function of the
data, so that a resumed run codes as the run straight through did.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..lowbit import CODES, SCALE, StateFormat
from ..precision import hashed_noise
from ..rules import StepRule
from .compile import _compiles, coefficient_dtype, run_chunks
from .compiled import CompiledStep
from .steps import split_by_wd

__all__ = ['elementwise', 'coded_formats', 'coded_ready', 'one_row_pieces', 'run_coded', 'CODED_CHUNK']

# Pieces per compiled call: the step takes as long with 1, 2 or 4 (Adam, 8-bit state, xresnet50, CPU:
# 190, 187, 183 ms), and the first compile grows with the count (8: 12.5 s against 4.4 s with 2).
CODED_CHUNK = 1


def elementwise(fused) -> CompiledStep | None:
    "The compiled update of fused step `fused` (an `EitherStep`'s compiled half) when it is elementwise, else None."
    step = getattr(fused, 'compiled', fused)
    whole = isinstance(step, CompiledStep) and not step.returns and step.then is None and step.pack_step is None
    return step if whole else None


def coded_formats(state_format: StateFormat, rule: StepRule, params: list) -> tuple | None:
    """For each state key of `rule`: None (kept as it is) or (format, nonnegative), the same for every param;
    None when a compiled loop cannot code them (a format not coded in rows, blocks of two sizes, params whose
    keys differ)."""
    keys = state_format.keys(rule, params[0])
    if not keys or any(not fmt.in_rows for fmt in keys.values()) or len({f.blocksize for f in keys.values()}) > 1:
        return None
    if any(state_format.keys(rule, p) != keys for p in params[1:]): return None
    return tuple((keys[k], rule.state[k].nonnegative) if k in keys else None for k in rule.state_keys)


_WRAPPED: dict = {}
# A block's new state is needed twice: for its absmax, then for its codes. By default inductor stores such a
# value (many ops, several users) in a full-size buffer between the two loops; for formats decoded in
# arithmetic, recomputing it from the inputs instead (thresholds past any update's size) moves a third of
# the bytes (Adam, companded 8-bit state, one 16M-element param, CPU: 31.5 ms a step, against 99 ms with
# three float32 buffers); formats decoded by lookups lose by it (xresnet50: 232 against 187 ms).
_RECOMPUTE = {'realize_reads_threshold': 1000, 'realize_cpu_opcount_threshold': 1000, 'realize_opusers_threshold': 1000,
              'realize_cpu_acc_reads_threshold': 1000}


def _coded_update(update: Callable, formats: tuple, stochastic: bool) -> Callable:
    """`update(p, g, *states, c)` taking each coded state as its codes and scales (rows of one block, see the
    module docstring): decoded before it, coded again after it, in its compiled loop."""
    key = (update, formats, stochastic)
    if key in _WRAPPED: return _WRAPPED[key]

    def coded(p, g, *tensors):
        *tensors, c = tensors
        for t in (g, *tensors): torch._check(t.shape[0] == p.shape[0])  # one row a block, in every operand
        states, decoded, i = [], [], 0
        for fmt in formats:
            if fmt is None:
                states.append(tensors[i]); i += 1
                continue
            codes, scales = tensors[i], tensors[i + 1]; i += 2
            x = fmt[0].decode_rows(codes, scales, fmt[1]).to(p.dtype)
            for a, b in zip(x.shape, p.shape): torch._check(a == b)  # sizes traced apart (`_size_configs`) are one
            states.append(x); decoded.append((fmt, codes, scales, x))
        update(p, g, *states, c)
        for (low, nonnegative), codes, scales, x in decoded:
            new, absmax = low.encode_rows(x, nonnegative, hashed_noise(x.float(), p.float()) if stochastic else None)
            codes.copy_(new); scales.copy_(absmax)
    coded.__name__ = f"{update.__name__}_coded"
    if all(fmt[0].arithmetic for fmt in formats if fmt is not None): coded.inductor_options = _RECOMPUTE
    _WRAPPED[key] = coded
    return coded


def _phases(step: CompiledStep, formats: tuple, stochastic: bool, hypers: dict) -> tuple:
    ((update, mode),) = step._phases(hypers)
    return ((_coded_update(update, formats, stochastic), mode),)


def _rows(t: torch.Tensor, n: int, block: int, scales: bool = False) -> list[torch.Tensor]:
    """Dense `t`, a tensor of `n` elements cut in `block`-element blocks (or, `scales`, one element per block),
    as its whole blocks' rows and its last one's: aliases made with `set_` (see `flat_alias`: a view would
    recompile for every shape)."""
    whole, rest = divmod(n, block)
    width = 1 if scales else t.numel() * block // n  # elements of `t` per block (4-bit codes: half a block)
    shapes = ([(whole, width)] if whole else []) + ([(1, 1 if scales else rest * t.numel() // n)] if rest else [])
    pieces, offset = [], t.storage_offset()
    for rows, cols in shapes:
        pieces.append(torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), offset, (rows, cols), (cols, 1)))
        offset += rows * cols
    return pieces


def _operands(params, grads, states, rule: StepRule, formats: tuple, comps, idx) -> list[list[list[torch.Tensor]]]:
    """The pieces of the params at `idx`, one list per operand of the coded update (see `_coded_update`): those
    of many rows, then those of one row (a param's last short block), apart (see the module docstring)."""
    block = next(f[0].blocksize for f in formats if f is not None)
    groups = {}
    for i in idx:
        p, state = params[i], states[i]
        n = p.numel()
        operands = [_rows(p, n, block), _rows(grads[i], n, block)]
        for key, fmt in zip(rule.state_keys, formats):
            if fmt is None: operands.append(_rows(state[key], n, block))
            else: operands += [_rows(state[key + CODES], n, block), _rows(state[key + SCALE], n, block, scales=True)]
        if comps is not None: operands.append(_rows(comps[i], n, block))
        for k, piece in enumerate(operands[0]):
            lists = groups.setdefault(piece.shape[0] == 1, [[] for _ in operands])
            for xs, pieces in zip(lists, operands): xs.append(pieces[k])
    return [groups[one] for one in (False, True) if one in groups]


def _chunks(lists: list[list[torch.Tensor]]) -> list:
    "`lists` in calls of `CODED_CHUNK` pieces (the last may be short: a graph of its own)."
    return [[xs[s:s + CODED_CHUNK] for xs in lists] for s in range(0, len(lists[0]), CODED_CHUNK)]


def _operand_kinds(p: torch.Tensor, formats: tuple, state_dtypes: tuple, rounding) -> list[tuple[torch.dtype, int]]:
    "(dtype, elements per block of the param) of each operand of the coded update."
    block = next(f[0].blocksize for f in formats if f is not None)
    out = [(p.dtype, block), (p.dtype, block)]
    for fmt, dtype in zip(formats, state_dtypes):
        out += [(dtype, block)] if fmt is None else [(torch.uint8, fmt[0].n_codes(block)),
                                                   (fmt[0].scale_dtype, 1)]
    if rounding is not None and rounding.kahan: out.append((rounding.comp_dtype, block))
    return out


def one_row_pieces(formats: tuple, params: list) -> bool:
    "Whether some param of `params` has a piece of one row: a last short block, or a single whole one."
    block = next(f[0].blocksize for f in formats if f is not None)
    return any(p.numel() % block or p.numel() < 2 * block for p in params)


def coded_ready(step: CompiledStep, formats: tuple, stochastic: bool, p: torch.Tensor, hypers: dict,
                state_dtypes: tuple, rounding=None, one_row: bool = True) -> bool:
    """Whether the coded update compiled for params like `p` (plain state of `state_dtypes`; 16-bit params
    written back as `rounding` says), tried on dummy pieces before any real tensor is touched (see `compiles`);
    the graph for pieces of one row only where `one_row` says some param has them."""
    block = next(f[0].blocksize for f in formats if f is not None)
    for fmt in formats:
        if fmt is not None: fmt[0].prepare_rows(fmt[1], p.device)
    operands = _operand_kinds(p, formats, state_dtypes, rounding)
    phases, mode = _phases(step, formats, stochastic, hypers), rounding.mode if rounding is not None else None

    def attempt():
        # Inductor plans its loops from the sizes it first sees: many rows, as real params have.
        c = torch.ones(len(step.layout), dtype=coefficient_dtype(p.dtype), device=p.device)
        for rows in (256, 1) if one_row else (256,):  # pieces of many rows, and of one
            lists = [[torch.ones(rows, width, dtype=dtype, device=p.device) for _ in range(CODED_CHUNK)]
                     for dtype, width in operands]
            run_chunks(phases, _chunks(lists), c, CODED_CHUNK, mode)
    return _compiles((phases, tuple(operands), p.device.type, mode, one_row), [phases[0][0]], p, attempt)


def run_coded(step: CompiledStep, formats: tuple, stochastic: bool, rule: StepRule, params, grads, states, do_wd,
              hypers, *, wd: float, decouple_wd: bool, comps=None, rounding=None) -> None:
    """Step `params`, whose state (dicts, coded ones with codes and scales already there) `formats` describes
    (see `coded_formats`), by `step`'s update in one compiled pass; weight decay as `CompiledStep.run` does it."""
    phases, p0 = _phases(step, formats, stochastic, hypers), params[0]
    rule_c = step.layout.values(step.coefficients(**hypers))
    for idx, takes_wd in split_by_wd(do_wd, wd):
        c, _ = step.coefficient_vector(rule_c, p0, hypers['lr'], wd if takes_wd else 0., decouple_wd)
        for lists in _operands(params, grads, states, rule, formats, comps, idx):
            run_chunks(phases, _chunks(lists), c, len(lists[0]), rounding.mode if rounding is not None else None)
