"""Blockwise 8-bit and 4-bit quantization of optimizer state: bitsandbytes' 8-bit format and torchao's 4-bit
format, code for code.

A tensor is cut, in flat order, into blocks of `blocksize` elements (the last may be short); each block
keeps its absolute maximum (`absmax`, float32) and each element one byte: the index of a 256-entry `map`'s
value nearest to element / absmax, found as bitsandbytes' CPU kernel finds it (so that the codes are its
own): [-1, 1] is cut into 65,536 even bins, each bin's centre given its nearest map entry once, and each
element takes the entry of the bin it rounds to (within half a bin, 1.5e-5, of nearest). A block of zeros
keeps code 0. The dynamic maps (Dettmers 2015, "8-bit approximations for
parallelism in deep learning") spread their values over seven decades: for each decade 10⁻⁶…10⁰, the
midpoints of an even split of [0.1, 1] into 2ᵉ parts (signed map, mirrored for negatives) or 2ᵉ⁺¹
parts (unsigned map, for second moments), plus 0 and 1.

4 bits (`quantize_4bit`, torchao's optimizer state): blocks of 128 elements whose scale is their absmax
(at least 1e-12), codes into a 16-entry map, two to a byte (the first element in the high nibble): the
signed dynamic map with three decades (1e-2, 1e-1, 1e0) for first moments, and for second moments the
linear map 1/16, 2/16, ..., 1 (no zero, so that a second moment never rounds to nothing); each element
takes the largest entry at most its value, or the next one up from halfway (a tie goes up).
"""
from __future__ import annotations

import torch

__all__ = ['dynamic_map', 'linear_map', 'quantize_blockwise', 'quantize_stochastic', 'dequantize_blockwise', 'quantize_4bit',
           'dequantize_4bit', 'decode_rows', 'encode_rows', 'bin_table', 'decode_rows_4bit', 'encode_rows_4bit',
           'companded_decode_rows', 'companded_encode_rows', 'companded_scale',
           'BLOCKSIZE', 'BLOCKSIZE_4BIT', 'BLOCKSIZE_COMPANDED']

BLOCKSIZE = 256  # elements per block of 8-bit state (bitsandbytes' optimizers')
BLOCKSIZE_4BIT = 128  # and of 4-bit state (torchao's)
BLOCKSIZE_COMPANDED = 64  # and of companded 8-bit state (bfloat16 scales: 1.03 bytes an element)
_DECADES = {8: 7, 4: 3}


def dynamic_map(signed: bool = True, bits: int = 8) -> torch.Tensor:
    "The 2**bits values of the dynamic map (8 or 4 bits), ascending, in float32 (see the module docstring)."
    decades, values = _DECADES[bits], [0., 1.]
    for e in range(decades):
        parts = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        level = (edges[:-1] + edges[1:]) / 2 * (10. ** (e - decades + 1))
        values += level.tolist() + ((-level).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_map(bits: int = 4) -> torch.Tensor:
    "1/2**bits, 2/2**bits, ..., 1: the 4-bit map of second moments (no zero), in float32."
    return torch.linspace(0, 1, 2 ** bits + 1, dtype=torch.float32)[1:]


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    "`x` flat, zero-padded to whole blocks, as rows of `blocksize`; and its number of elements."
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    if pad: flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize), n


def _scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` flat, each element times its block's 1 / absmax (as bitsandbytes scales: NaN in a block of zeros),
    and the absmax of each block."""
    rows, n = _blocks(x, blocksize)
    absmax = rows.abs().amax(dim=1)
    return (rows * (1. / absmax)[:, None]).reshape(-1)[:n], absmax


_BINS = 65536
_TABLES: dict = {}  # a map's values (as a tuple) -> its bin table


def bin_table(map: torch.Tensor) -> torch.Tensor:
    """For each of `_BINS` even bins over [-1, 1], the index of the map entry nearest its centre: the number of
    midpoints between consecutive entries below it (all in float32, as bitsandbytes computes it)."""
    key = tuple(map.tolist())
    if key not in _TABLES:
        m = map.float().cpu()
        midpoints = 0.5 * (m[:-1] + m[1:])
        centres = -1. + (2. * torch.arange(_BINS, dtype=torch.float32)) / (_BINS - 1)
        _TABLES[key] = torch.searchsorted(midpoints, centres).to(torch.uint8)
    return _TABLES[key]


def quantize_blockwise(x: torch.Tensor, map: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): one uint8 per element of `x`, in its shape (see the module docstring); one float32
    absmax per block."""
    scaled, absmax = _scaled(x, blocksize)  # a block of zeros gives NaN here: code 0 below
    return _nearest(scaled, map).view(x.shape), absmax


def _bin_of(scaled: torch.Tensor) -> torch.Tensor:
    "The bin (float, to be truncated) each of `scaled` rounds to: one expression, so that every coder agrees bit for bit."
    return (scaled.clamp(-1., 1.) + 1.) * 0.5 * (_BINS - 1) + 0.5


def _nearest(scaled: torch.Tensor, map: torch.Tensor) -> torch.Tensor:
    "The index (uint8) of the entry of `map` nearest each of `scaled`, through the bin table (NaN: 0)."
    bins = _bin_of(scaled).nan_to_num_(0.).long()
    return bin_table(map).to(scaled.device).index_select(0, bins)  # index_select: 3x faster than indexing


def quantize_stochastic(x: torch.Tensor, map: torch.Tensor, blocksize: int = BLOCKSIZE,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise`'s format, each element rounded without bias: to the entry just below its scaled
    value or the one just above, the upper with probability (value − below) / (above − below), so that the
    dequantized value is the value in expectation. An exponential average written back this way keeps
    increments far below the map's spacing, which rounding to nearest would drop (β = 0.999: 0.1% of the
    average)."""
    scaled, absmax = _scaled(x, blocksize)
    scaled = scaled.nan_to_num_(0.).clamp_(-1, 1)  # a block of zeros: the zero entry
    return _round_stochastic(scaled, map, generator).view(x.shape), absmax


def _round_stochastic(scaled: torch.Tensor, map: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The uint8 index of the entry of ascending `map` just below or just above each of `scaled`, drawn without
    bias. The entry below is found from the nearest one in the bin table (a binary search took twice as long):
    exact where entries lie more than a bin (2/65535 of a block's absmax) apart; among the dynamic map's
    smallest entries, which share bins, a value may be drawn between two entries beside it instead, off by
    at most a bin, as bitsandbytes' own coder is."""
    map = map.to(scaled.device)
    near = _nearest(scaled, map).long()
    below = (near - (map.index_select(0, near) > scaled).long()).clamp_(0, map.numel() - 2)
    lo, hi = map.index_select(0, below), map.index_select(0, below + 1)
    chance = ((scaled - lo) / (hi - lo)).clamp_(0, 1)
    draws = torch.rand(scaled.shape, generator=generator, device=scaled.device)
    return (below + (draws < chance)).to(torch.uint8)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, map: torch.Tensor,
                         blocksize: int = BLOCKSIZE) -> torch.Tensor:
    "The float32 values `codes` stand for: map[code] · its block's absmax, in the codes' shape."
    n = codes.numel()
    values = map.to(absmax.device).index_select(0, codes.reshape(-1).long())
    pad = -n % blocksize
    if pad: values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(-1, blocksize) * absmax[:, None]).reshape(-1)[:n].view(codes.shape)


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    "`table[index]`, by `index_select` (eagerly several times faster than indexing; compiled, the same loads)."
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def decode_rows(codes: torch.Tensor, scales: torch.Tensor, map: torch.Tensor) -> torch.Tensor:
    """`dequantize_blockwise` inside a compiled loop: `codes` as rows of one block each (a param's whole
    blocks, or its last short one), `scales` their absmax as a column."""
    return _lookup(map, codes.int()) * scales.view(-1, 1)  # one column, whatever size its width was traced with


def encode_rows(x: torch.Tensor, map: torch.Tensor, bins: torch.Tensor, noise: torch.Tensor | None,
                absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise` (`noise` None) or a stochastic coding of `x` inside a compiled loop, rows of one
    block each: (uint8 codes, absmax as a column). Codes to nearest equal `quantize_blockwise`'s, bit for bit.
    Stochastic: to the map's entry nearest the scaled value or the one beside it on the value's side, the
    latter with probability (value − nearest) / (beside − nearest), given `noise` (16 random bits an element,
    `bins` being `bin_table(map)`): unbiased as `quantize_stochastic` is, with two lookups in the map instead
    of three and no random number generator (gathers are this loop's cost: they do not vectorise).
    `absmax` (a column): the blocks' absmax when the rows hold only part of them (a shard's, see `lowbit.py`)."""
    x = x.float()
    if absmax is None: absmax = x.abs().amax(dim=1, keepdim=True)
    scaled = x * (1. / absmax)  # NaN in a block of zeros
    if noise is None: return _lookup(bins, torch.where(absmax > 0, _bin_of(scaled), 0.).int().clamp(0, _BINS - 1)), absmax
    scaled = torch.where(absmax > 0, scaled, 0.).clamp(-1., 1.)  # a block of zeros: the zero entry
    near = _lookup(bins, _bin_of(scaled).int().clamp(0, _BINS - 1)).int()
    mid = _lookup(map, near)
    side = (scaled > mid).int() * 2 - 1  # int32 (eagerly, half the bytes of where()'s int64)
    beside = _lookup(map, (near + side).clamp(0, map.numel() - 1))
    # The chance (value − nearest) / (beside − nearest) against the noise, without a division. No entry beside
    # (the signed map's least entry is −0.993: a value of −1 has none below it): the clamp keeps the nearest.
    up = noise.float() * (2. ** -16) * (beside - mid).abs() < (scaled - mid).abs()
    return (near + side * up.int()).clamp(0, map.numel() - 1).to(torch.uint8), absmax


def decode_rows_4bit(codes: torch.Tensor, scales: torch.Tensor, map: torch.Tensor) -> torch.Tensor:
    """`dequantize_4bit` inside a compiled loop: `codes` as rows of one block each (two codes a byte, the first
    in the high nibble), `scales` a column."""
    indices = torch.stack([codes >> 4, codes & 0b1111], dim=-1).view(codes.shape[0], -1)
    return _lookup(map, indices.int()) * scales.view(-1, 1)


def encode_rows_4bit(x: torch.Tensor, map: torch.Tensor, entries: tuple, noise: torch.Tensor | None,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_4bit` inside a compiled loop, rows of one block each: (codes, two a byte; scales, a column).
    To nearest (`noise` None) its codes, bit for bit; with `noise` (16 random bits an element) the entry
    below or above, unbiased. The entry below is counted from the map's 16 values (`entries`, Python floats:
    constants of the graph), not searched for."""
    x = x.float()
    if scale is None: scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    scaled = x / scale
    below = sum((scaled >= v).int() for v in entries[1:])  # the largest entry at most the value (the first if none)
    if noise is None:
        up = (below + 1).clamp(max=len(entries) - 1)
        low = _lookup(map, below)
        codes = torch.where(scaled - low >= (_lookup(map, up) - low) * 0.5, up, below)
    else:
        below = below.clamp(max=len(entries) - 2)
        low, high = _lookup(map, below), _lookup(map, below + 1)
        # The chance (value − low) / (high − low) against the noise, without a division.
        codes = below + (noise.float() * (2. ** -16) * (high - low) < scaled.clamp(entries[0], entries[-1]) - low).int()
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], scale


def quantize_4bit(x: torch.Tensor, map: torch.Tensor, blocksize: int = BLOCKSIZE_4BIT, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): `x`'s elements (a multiple of `blocksize` of them, an even number) as 4-bit indices
    into the 16-entry `map`, two to a byte, flat; one float32 scale per block (see the module docstring).
    `stochastic`: each element rounded without bias between the entries around it (see `quantize_stochastic`;
    one below the map's least entry takes that entry, as rounding to nearest does: the linear map has no zero)."""
    n = x.numel()
    if n % blocksize or n % 2:
        raise ValueError(f"Invalid tensor for 4-bit state: {n} elements (must be a multiple of {blocksize}, and even)")
    rows = x.reshape(-1, blocksize).float()
    scale = rows.abs().amax(dim=1).clamp_min(1e-12)
    scaled = (rows / scale[:, None]).reshape(-1)
    map = map.to(scaled.device)
    if stochastic: codes = _round_stochastic(scaled.clamp(map[0], map[-1]), map, generator)
    else:
        below = (torch.searchsorted(map, scaled, right=True) - 1).clamp_(0, map.numel() - 1)  # largest entry <= value
        up = (below + 1).clamp_(max=map.numel() - 1)
        codes = torch.where(scaled - map[below] >= (map[up] - map[below]) * 0.5, up, below).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], scale


def dequantize_4bit(codes: torch.Tensor, scale: torch.Tensor, map: torch.Tensor, shape) -> torch.Tensor:
    "The float32 values, in `shape`, of 4-bit `codes` (two to a byte) with their blocks' `scale`."
    indices = torch.stack([codes >> 4, codes & 0b1111], dim=-1).reshape(-1).long()
    return (map.to(scale.device).index_select(0, indices).view(scale.numel(), -1) * scale[:, None]).view(shape)


# Companded 8-bit state (`companded_encode_rows`): levels of the companded value, in units of a level.
_SIGNED_LEVELS, _UNSIGNED_LEVELS = 127, 256


def _round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    "Nonnegative float32 `x` rounded up to bfloat16 (so that no element of a block scales past 1)."
    return ((x.view(torch.int32) + 0xFFFF) & -65536).view(torch.float32).to(torch.bfloat16)


def companded_scale(largest: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    "The bfloat16 scale of companded blocks whose largest value (absolute, for signed blocks) is `largest`."
    return _round_up_to_bfloat16(largest.sqrt() if nonnegative else largest)


def companded_encode_rows(x: torch.Tensor, nonnegative: bool, noise: torch.Tensor | None,
                          scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` (one block each) as 8-bit codes of their square roots and the blocks' scales (a bfloat16
    column), in arithmetic: no table, so that a compiled loop vectorises it, and no division but one a
    block.

    A block's values relative to its largest are coded as the square of a level: fine where most values
    lie, near zero (the smallest nonzero code stands for 6e-5 of the largest, where a linear code would
    stand for 8e-3), coarse near the largest. Averages that take both signs: scale s = the block's absmax,
    value v = x / s ≈ sign(k)·(k / 127)², k = −127…127 (code k + 127). Second moments: s = √max,
    x / s² ≈ ((c + 1) / 256)², c = 0…255: no zero level, so that a second moment never decodes to 0 under
    a momentum that does not (a value below the least level takes it: its update shrinks rather than
    growing without bound). Scales are rounded up to bfloat16.

    To nearest: the nearest level of the square root. With `noise` (16 random bits an element): the level
    below or the one above, the upper with probability (x − below) / (above − below) measured in x itself,
    so that the decoded value is x in expectation. `scale` (a column): the blocks' scales when the rows hold
    only part of them (a shard's, see `lowbit.py`)."""
    x = x.float()
    if scale is None: scale = companded_scale((x if nonnegative else x.abs()).amax(dim=1, keepdim=True), nonnegative)
    s = scale.float()
    if nonnegative:
        level = x.sqrt() * torch.where(s > 0, _UNSIGNED_LEVELS / s, 0.) - 1.
        if noise is None: return level.round().clamp(0., _UNSIGNED_LEVELS - 1.).to(torch.uint8), scale
        below = level.floor().clamp(0., _UNSIGNED_LEVELS - 2.)
        # In units of a level squared: value (level + 1)², below (below + 1)², above (below + 2)²; the chance
        # (value − below) / (above − below) compared with the noise without a division.
        up = noise.float() * (2. ** -16 * (2. * below + 3.)) < (level + 1.) ** 2 - (below + 1.) ** 2
        return (below + up.float()).to(torch.uint8), scale
    v = x * torch.where(s > 0, 1. / s, 0.)
    level = v.abs().sqrt() * _SIGNED_LEVELS  # of |v|; the sign goes on after
    if noise is None: below, up = level.round(), 0.
    else:
        below = level.floor().clamp(max=_SIGNED_LEVELS - 1.)
        up = (noise.float() * (2. ** -16 * (2. * below + 1.)) < level * level - below * below).float()
    return (torch.where(v < 0, -(below + up), below + up) + _SIGNED_LEVELS).to(torch.uint8), scale


def companded_decode_rows(codes: torch.Tensor, scales: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    "The float32 values of `companded_encode_rows`' codes (rows of one block each) and scales (a column)."
    scales = scales.float().view(-1, 1)  # one column, whatever size its width was traced with
    if nonnegative: return ((codes.float() + 1.) * (1. / _UNSIGNED_LEVELS) * scales) ** 2
    level = (codes.float() - _SIGNED_LEVELS) * (1. / _SIGNED_LEVELS)
    return level * level.abs() * scales
