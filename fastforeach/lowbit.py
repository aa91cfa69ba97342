"""Optimizer state in 8 or 4 bits: every optimizer's keyword-only `state_format`.

An average (momentum, a second moment) of a param of at least `min_numel` elements is kept as codes and
scales (see `quantize.py`), under its key with `CODES` and `SCALE` appended (`grad_avg_codes`,
`grad_avg_scale`): its own key is then absent, so that an optimizer that does not know the format fails
on it rather than reading codes as values.

- `'8bit'`: bitsandbytes' format: one byte an element, shaped like the param, and one float32 absmax per
  256 elements (in the param's flat order): 1.016 bytes an element; the signed dynamic map for averages
  that take both signs, the unsigned one for second moments.
- `'4bit'`: torchao's format: two elements a byte (flat), one float32 scale per 128: 0.53 bytes an element;
  the 4-bit signed dynamic map, and the linear map without zero for second moments. Only params of a
  whole number of blocks (as torchao's).
- `'8bit-companded'`: one byte an element coding the square root of each value relative to its 64-element
  block's largest, bfloat16 scales: 1.03 bytes an element, coded in arithmetic (see
  `quantize.companded_encode_rows`), so that a compiled loop vectorises it.

A fused step whose update is elementwise decodes, steps and codes each param's state in one compiled loop
(`fused/coded.py`); otherwise a step decodes a cache-sized chunk of params' state to float32 (float64 for
float64 params), runs the optimizer's rule on it, and encodes it back (`Quantized` in `core/paths.py`).
Either way there is no float32 copy of the whole model's state. `rounding` says how the codes are
written: `'stochastic'` (default) to the entry below or above at random, unbiased, so that an average with
β = 0.999 keeps increments far below the map's spacing, with noise hashed from each new value and its
param's (a resumed run codes as the run straight through did); `'nearest'`, bitsandbytes' and torchao's
own rounding, code for code.

Params sharded along dim 0 (FSDP2) keep 8-bit state: each rank the codes of its shard (a DTensor laid
out as the param) and the scales of every block of the param (replicated: 1/256 or 1/32 of the codes'
bytes of the whole param). A shard is one run of the param's flat order and may start and end inside a
block: a step scales the blocks shards share by their largest value over every rank (one all-reduce of
the blocks' maxima per bucket), so that the codes are one process's, whatever the number of ranks.
4-bit codes, two elements a byte, are not sharded.

`state_format` is a format's name for every average, a dict of state key -> format name (keys left out
stay in full precision), or a `StateFormat` with the rounding and the size threshold too. Weights kept
as state (ScheduleFreeAdam's `z`) and what is not an average (Adan's `prev_grad`) stay in full precision:
`StateSpec.average`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .quantize import (BLOCKSIZE, BLOCKSIZE_4BIT, BLOCKSIZE_COMPANDED, bin_table, companded_decode_rows, companded_encode_rows,
                       companded_scale,
                       decode_rows, decode_rows_4bit, dequantize_4bit, dequantize_blockwise, dynamic_map, encode_rows,
                       encode_rows_4bit, linear_map, quantize_4bit, quantize_blockwise)
from .distributed import as_like, complete_max, flat_start, is_sharded, local, whole, wrap_like
from .precision import hashed_noise
from .rules import StepRule

__all__ = ['LowBit', 'Companded', 'FORMATS', 'StateFormat', 'CODES', 'SCALE', 'ROUNDINGS', 'state_format_of', 'saved_format',
           'unlike_any', 'plain_state']

CODES, SCALE = '_codes', '_scale'  # state[key + CODES] and state[key + SCALE]: the codes and scales of state `key`
ROUNDINGS = ('stochastic', 'nearest')


@dataclass(frozen=True)
class LowBit:
    "One way of keeping a state tensor in few bits: codes of `bits` bits, a scale per `blocksize` elements."
    name: str
    bits: int
    blocksize: int
    scale_dtype: torch.dtype = torch.float32

    def map(self, nonnegative: bool) -> torch.Tensor:
        "The values the codes index: unsigned (second moments) or signed."
        if self.bits == 8: return _cached(('8', nonnegative), lambda: dynamic_map(signed=not nonnegative))
        return _cached(('4', nonnegative), lambda: linear_map(4) if nonnegative else dynamic_map(True, 4))

    def fits(self, numel: int) -> bool:
        "Whether a param of `numel` elements can keep state in this format (4 bits: whole blocks)."
        return self.bits == 8 or numel % self.blocksize == 0

    def n_codes(self, numel: int) -> int: return numel * self.bits // 8
    def n_scales(self, numel: int) -> int: return math.ceil(numel / self.blocksize)

    def zeros(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        "(codes, scales) of zeros for `p` (8-bit codes shaped like it, 4-bit ones flat): a block of scale 0."
        codes = torch.zeros(self.n_codes(p.numel()), dtype=torch.uint8, device=p.device)
        scales = torch.zeros(self.n_scales(p.numel()), dtype=self.scale_dtype, device=p.device)
        return (codes.view(p.shape) if self.bits == 8 else codes), scales

    def encode(self, x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        "(codes, scales) of `x`, to nearest (bitsandbytes' and torchao's codes): 8-bit codes shaped like `x`, 4-bit ones flat."
        map = self.map(nonnegative)
        if self.bits == 4: return quantize_4bit(x, map, self.blocksize)
        return quantize_blockwise(x, map, self.blocksize)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, nonnegative: bool, shape) -> torch.Tensor:
        "The float32 values, in `shape`, that `codes` and `scales` stand for."
        map = self.map(nonnegative)
        if self.bits == 4: return dequantize_4bit(codes, scales, map, shape)
        return dequantize_blockwise(codes, scales, map, self.blocksize).view(shape)

    # In a compiled loop (see `fused/coded.py`): a param's state as rows of one block each.
    arithmetic = False  # decoded by lookups in a table, which a loop had better not do twice

    in_rows = True  # a compiled loop codes it (a stand-in format may say not)

    def decode_rows(self, codes: torch.Tensor, scales: torch.Tensor, nonnegative: bool) -> torch.Tensor:
        "float32 values of `codes` (rows of one block each) with `scales` (a column), inside a compiled loop."
        map = self._tables(nonnegative, codes.device)[0]
        return decode_rows(codes, scales, map) if self.bits == 8 else decode_rows_4bit(codes, scales, map)

    def encode_rows(self, x: torch.Tensor, nonnegative: bool, noise: torch.Tensor | None, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of rows `x`, to nearest or (given `noise`, 16 random bits an element) stochastically;
        the rows' `scale` (a column, `scale_of` their blocks' largest) where they hold only part of their blocks."""
        map, bins = self._tables(nonnegative, x.device)
        if self.bits == 8: return encode_rows(x, map, bins, noise, scale)
        return encode_rows_4bit(x, map, _cached(('entries', self.name, nonnegative), lambda: tuple(map.tolist())), noise,
                                scale)

    def scale_of(self, largest: torch.Tensor, nonnegative: bool) -> torch.Tensor:
        "The scales of blocks whose largest absolute values are `largest`."
        return largest if self.bits == 8 else largest.clamp_min(1e-12)

    # A run of a param's flat order (a shard of it, or all of it) that starts `head` elements into a block.
    @property
    def in_runs(self) -> bool:
        "Whether a run that starts inside a block can keep state in this format (4-bit codes pack two a byte: no)."
        return self.bits == 8

    def run_blocks(self, start: int, numel: int) -> tuple[int, int, int]:
        """(head, first, count) of elements `start` … `start + numel − 1` of a flat order: how far into its
        first block the run starts, and the blocks it touches."""
        head, first = start % self.blocksize, start // self.blocksize
        return head, first, -(-(head + numel) // self.blocksize)

    def decode_run(self, codes: torch.Tensor, scales: torch.Tensor, nonnegative: bool, head: int = 0) -> torch.Tensor:
        """The float32 values (flat) of the codes of a run of elements starting `head` elements into its first
        block, with the scales of the blocks it touches."""
        n = codes.numel() * 8 // self.bits
        rows = _padded_rows(codes.reshape(-1), self.n_codes(self.blocksize), self.n_codes(head))
        return self.decode_rows(rows, scales, nonnegative).reshape(-1)[head:head + n]

    def run_rows(self, x: torch.Tensor, head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        "A run's values (see `decode_run`) as float32 rows of one block, zero-padded; and each row's largest |value|."
        rows = _padded_rows(x.reshape(-1).float(), self.blocksize, head)
        return rows, rows.abs().amax(dim=1, keepdim=True)

    def encode_run(self, rows: torch.Tensor, scale: torch.Tensor, nonnegative: bool, noise: torch.Tensor | None,
                   head: int, numel: int) -> torch.Tensor:
        """The codes (flat) of a run of `numel` elements starting `head` elements into its first block: `run_rows`
        and their blocks' `scale` (a column: `scale_of` their largest values over every rank that shares them);
        stochastically given `noise` (16 random bits an element of the run)."""
        if noise is not None: noise = _padded_rows(noise.reshape(-1), self.blocksize, head)
        codes, _ = self.encode_rows(rows, nonnegative, noise, scale)
        return codes.reshape(-1)[self.n_codes(head):self.n_codes(head + numel)]

    def prepare_rows(self, nonnegative: bool, device) -> None:
        "Make what the compiled coders look up on `device`, before they are traced."
        map = self._tables(nonnegative, device)[0]
        _cached(('entries', self.name, nonnegative), lambda: tuple(map.tolist()))

    def _tables(self, nonnegative: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        "The map and its bin table on `device`, made once."
        return _cached((self.name, nonnegative, device), lambda: (self.map(nonnegative).to(device),
                                                                  bin_table(self.map(nonnegative)).to(device)))

    def unlike(self, codes, scales, p: torch.Tensor) -> str | None:
        "None when `codes` and `scales`, saved for `p`, are this format's for it; else what they are instead."
        n = p.numel()
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.numel() != self.n_codes(n):
            got = f"{codes.dtype} with {codes.numel()} elements" if isinstance(codes, torch.Tensor) else type(codes).__name__
            return f"codes are {got}, expected uint8 with {self.n_codes(n)} elements ({self.name})"
        if not isinstance(scales, torch.Tensor) or scales.dtype != self.scale_dtype or scales.shape != (self.n_scales(n),):
            got = f"{scales.dtype} of shape {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
            return f"scales are {got}, expected {self.scale_dtype} of shape ({self.n_scales(n)},) ({self.name})"
        return None


@dataclass(frozen=True)
class Companded(LowBit):
    """8-bit codes of companded values, in arithmetic (see `companded_encode_rows`): no table to look up, so a
    compiled loop codes them at nearly the speed of a float32 update; 64-element blocks with bfloat16 scales."""
    arithmetic = True

    def encode(self, x, nonnegative):
        codes, scales = companded_encode_rows(_padded_rows(x.float(), self.blocksize), nonnegative, None)
        return codes.reshape(-1)[:x.numel()].view(x.shape), scales.view(-1)

    def decode(self, codes, scales, nonnegative, shape):
        return self.decode_run(codes, scales, nonnegative).view(shape)

    def prepare_rows(self, nonnegative, device): pass
    def decode_rows(self, codes, scales, nonnegative): return companded_decode_rows(codes, scales, nonnegative)
    def encode_rows(self, x, nonnegative, noise, scale=None): return companded_encode_rows(x, nonnegative, noise, scale)
    def scale_of(self, largest, nonnegative): return companded_scale(largest, nonnegative)


def _padded_rows(x: torch.Tensor, blocksize: int, head: int = 0) -> torch.Tensor:
    "`x` flat, after `head` zeros and padded with zeros to whole blocks, as rows of one block."
    flat = x.reshape(-1)
    return torch.nn.functional.pad(flat, (head, -(head + flat.numel()) % blocksize)).view(-1, blocksize)


_MAPS: dict = {}


def _cached(key, make):
    if key not in _MAPS: _MAPS[key] = make()
    return _MAPS[key]


FORMATS = {'8bit': LowBit('8bit', 8, BLOCKSIZE), '4bit': LowBit('4bit', 4, BLOCKSIZE_4BIT),
           '8bit-companded': Companded('8bit-companded', 8, BLOCKSIZE_COMPANDED, torch.bfloat16)}


def saved_format(codes, scales, p: torch.Tensor) -> LowBit | None:
    "The format whose codes and scales for `p` these are (told apart by their sizes and dtypes), or None."
    return next((f for f in FORMATS.values() if f.fits(p.numel()) and f.unlike(codes, scales, p) is None), None)


def unlike_any(codes, scales, p: torch.Tensor) -> str:
    "Why `codes` and `scales` are the state of no format for `p`: the first that has as many codes says."
    if isinstance(codes, torch.Tensor):
        for f in FORMATS.values():
            if codes.numel() == f.n_codes(p.numel()) and f.fits(p.numel()): return f.unlike(codes, scales, p)
    got = f"{codes.dtype} with {codes.numel()} elements" if isinstance(codes, torch.Tensor) else type(codes).__name__
    return f"codes are {got}, the codes of no format for {p.numel()} elements"


@dataclass(frozen=True)
class StateFormat:
    """Which state keys are kept in few bits (`formats`: key -> `LowBit`, or one for every average), how they
    are rounded, and from how many elements a param's state is (smaller params keep theirs in full precision)."""
    formats: dict | LowBit = field(default_factory=dict)
    rounding: str = 'stochastic'
    min_numel: int = 4096
    _keys: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (rule fn, numel) -> `keys`

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Invalid state rounding: {self.rounding!r} (must be one of {ROUNDINGS})")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 1:
            raise ValueError(f"Invalid min_numel: {self.min_numel!r} (must be an int >= 1)")
        formats = self.formats if isinstance(self.formats, dict) else {None: self.formats}
        object.__setattr__(self, 'formats', {k: _format(v, 'state_format' if k is None else f"state_format[{k!r}]")
                                             for k, v in formats.items()})

    def check(self, rule: StepRule) -> None:
        "Raise `ValueError` for a key `rule` does not keep, or keeps but not as an average."
        for key in self.formats:
            if key is None: continue
            if key not in rule.state:
                raise ValueError(f"Invalid state_format: {rule.name} keeps no state {key!r} (its state: "
                                 f"{list(rule.state_keys)})")
            if not _quantizable(rule, key):
                raise ValueError(f"Invalid state_format: {rule.name}'s state {key!r} is not an average (a weight, or "
                                 "a value it must keep exactly): it stays in full precision")

    def keys(self, rule: StepRule, p: torch.Tensor) -> dict[str, LowBit]:
        """The state keys of `rule` that `p` keeps in few bits, with their format (none for small params): asked
        for every param at every step, so worked out once per rule and size."""
        n = p.numel()
        if n < self.min_numel: return {}
        if (rule.fn, n) not in self._keys:
            self._keys[rule.fn, n] = {key: fmt for key in rule.state_keys
                                      for fmt in [self.formats.get(key, self.formats.get(None))]
                                      if fmt is not None and _quantizable(rule, key) and fmt.fits(n)}
        return self._keys[rule.fn, n]

    def decoded(self, rule: StepRule, params: list, states: list, full: Callable, origins: list | None = None
                ) -> tuple[list, list]:
        """The state lists `rule` steps for `params`: the keys each keeps in few bits decoded (to float32, float64
        for float64 params; zeros on a first step), the others as they are (`full(key, p)` makes a missing one);
        and what `encode` writes back after the step. For sharded params, `params` are this rank's shards of
        `origins`: their codes are those of one run of the param's flat order, their scales the whole param's."""
        origins = params if origins is None else origins
        lists, coded = [[] for _ in rule.state_keys], []
        for p, origin, state in zip(params, origins, states):
            low, start = self.keys(rule, origin), flat_start(origin)
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for xs, key in zip(lists, rule.state_keys):
                fmt = low.get(key)
                if fmt is None:
                    if key not in state: state[key] = full(key, origin)
                    xs.append(local(state[key]))
                    continue
                nonnegative = rule.state[key].nonnegative
                if key + CODES in state:
                    head, first, count = fmt.run_blocks(start, p.numel())
                    x = fmt.decode_run(local(state[key + CODES]), state[key + SCALE][first:first + count], nonnegative,
                                       head).view(p.shape).to(dtype)
                else: x = torch.zeros(p.shape, dtype=dtype, device=p.device)
                xs.append(x)
                coded.append((state, key, fmt, nonnegative, x, p, origin))
        return lists, coded

    def encode(self, coded: list) -> None:
        """Write the stepped values of `decoded` back as codes and scales, into the tensors already kept (in place):
        stochastically with noise hashed from each value and its param's new value (see `precision.hashed_noise`:
        a resumed run codes as the run straight through did). The blocks that sharded params' shards share are
        scaled by their largest value over every rank (one all-reduce), so the codes are those of one process."""
        runs, shared = [], []
        for state, key, fmt, nonnegative, x, p, origin in coded:
            head, first, count = fmt.run_blocks(flat_start(origin), p.numel())
            rows, largest = fmt.run_rows(x, head)
            if is_sharded(origin):  # every block's largest, this rank's ones in place, completed below
                full = largest.new_zeros(fmt.n_scales(origin.numel()))
                full[first:first + count] = largest.view(-1)
                shared.append((full, origin))
            else: full = largest.view(-1)
            runs.append((rows, full, head, first, count))
        if shared: complete_max(*map(list, zip(*shared)))
        for (state, key, fmt, nonnegative, x, p, origin), (rows, full, head, first, count) in zip(coded, runs):
            scales = fmt.scale_of(full, nonnegative)  # the whole param's: this run's blocks are some of them
            noise = hashed_noise(x.float().reshape(-1), p.float().reshape(-1)) if self.rounding == 'stochastic' else None
            codes = fmt.encode_run(rows, scales[first:first + count].view(-1, 1), nonnegative, noise, head, p.numel())
            codes = codes.view(p.shape if fmt.bits == 8 else (-1,))
            if key + CODES in state:
                local(state[key + CODES]).copy_(codes); state[key + SCALE].copy_(scales)
            else:
                state[key + CODES] = wrap_like(codes, origin) if is_sharded(origin) else codes
                state[key + SCALE] = scales.to(fmt.scale_dtype)


def plain_state(rule: StepRule, p: torch.Tensor, state: dict) -> dict:
    "A copy of `p`'s `state` with its few-bit state decoded, in `p`'s dtype, and no scales: fastai's own layout."
    out = dict(state)
    for key in rule.state_keys:
        fmt = saved_format(out.get(key + CODES), out.get(key + SCALE), p)
        if fmt is None: continue
        value = fmt.decode(whole(out.pop(key + CODES)), whole(out.pop(key + SCALE)), rule.state[key].nonnegative, p.shape)
        out[key] = as_like(value, p) if is_sharded(p) else value.to(p.dtype)
    return out


def _quantizable(rule: StepRule, key: str) -> bool:
    spec = rule.state[key]
    return spec.like_param and spec.average and not spec.weight


def _format(value, name: str) -> LowBit:
    if isinstance(value, LowBit): return value
    if not isinstance(value, str) or value not in FORMATS:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {tuple(FORMATS)})")
    return FORMATS[value]


def state_format_of(value) -> StateFormat | None:
    "The `StateFormat` an optimizer's `state_format` keyword gives: None, a format's name, a dict, or one itself."
    if value is None or isinstance(value, StateFormat): return value
    if isinstance(value, (str, dict, LowBit)): return StateFormat(value)
    raise ValueError(f"Invalid state_format: {value!r} (must be None, one of {tuple(FORMATS)}, a dict of state "
                     "key -> format, or a StateFormat)")
