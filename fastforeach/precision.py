"""Params in 16 bits (bfloat16, float16): updates computed in float32 and written back without losing them.

A bf16 weight of 1.0 has neighbours 2^-7 apart: written back to the nearest bf16, any update below 2^-8
(0.004) is lost, so late in a one-cycle schedule most updates vanish. Every optimizer takes, for its
16-bit params, keyword-only `rounding`:

- `'kahan'` (default): Kahan summation. A compensation buffer per param, state key `kahan_comp`, keeps
  what rounding took off: the step works on w = p + comp in float32, then writes p = round(w) and
  comp = w − p. p + comp is the weight the update sees, as an fp32 master weight would be, in two
  halves. The buffer's dtype is `kahan_dtype`: float32 (default) keeps every update measured below;
  bfloat16 (as optimi does) saves 2 bytes a param and loses part of tiny updates; float16 underflows on
  weights below about 0.01.
- `'stochastic'`: stochastic rounding, to the neighbour above or below with probabilities that make the
  expected result w: no extra memory, unbiased, noisy.
- `'master24'`: 24-bit master weights (bfloat16 params only): beside each bf16 weight an int8 buffer
  (state key `kahan_comp`, as Kahan's) holding the next 8 bits of a float32 master below the weight's 16,
  in 1/256ths of its ulp. The step works on the master, w = p + comp·ulp/256 (exact in float32), rounds
  w's low byte away stochastically (so that updates far under the byte's step, 3e-5 at a weight of 1.0,
  keep their mean), then writes p = w rounded to nearest bf16 and comp = w − p.
  1 byte a param where the float32 buffer takes 4; the master is within ulp/256 of float32's. The
  correction cannot saturate: p is always the master's nearest bf16, so comp lies in [−128, 127]. A
  correction made from anything else (a float Kahan buffer loaded from a checkpoint, a float32 weight
  switched to bf16) is rounded to the nearest 1/256 ulp and clamped to that range.
- `'nearest'`: fastai's behaviour, exactly: the param is stepped by fastai's own steppers, each op
  rounded to 16 bits as fastai's native optimizer does (bit for bit; one param at a time, as fastai).

The state (averages, momentum) stays in the params' dtype, written back by stochastic rounding in every
mode but 'nearest': an average with β = 0.999 moves by 0.1% of itself a step, under half a bf16 ulp
(2^-9), so rounded to nearest it stops moving (QHAdam's second moment over 1000 steps of gradients
1 ± 0.5 ended 27% below float64's rounded to nearest, within 1% stochastically rounded). The noise is
hashed from the data (`hashed_noise`), so a resumed run is exact. float32 and float64 params are stepped
as they always are: `rounding` does not apply to them.

Moves of 1000 steps of −u on bf16 weights w0, as a fraction of the intended move (1 is exact; float32
working value; stochastic and master24: the mean over 4096 weights):

    w0     u      nearest  stochastic  kahan bf16  kahan fp16  kahan fp32  master24
    1.0    1e-4     0.000       1.001       0.994       1.001       1.000     1.001
    1.0    1e-5     0.000       0.994       0.896       0.977       1.001     1.002
    1.0    1e-6     0.000       0.992       0.488       0.961       1.013     1.014
    3.0    1e-5     0.000       1.006       0.391       1.072       1.001     1.001
    0.01   1e-8     0.000       0.970       0.381       0.000       1.024     1.026
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ['Rounding', 'ROUNDINGS', 'KAHAN_DTYPES', 'COMP', 'check_rounding', 'is_low_precision', 'stochastic_round',
           'random_bits', 'hashed_noise', 'state_value', 'kahan_split', 'master_value', 'BUFFERED', 'SEEDED', 'master_split', 'correction']

ROUNDINGS = ('kahan', 'master24', 'stochastic', 'nearest')
BUFFERED = ('kahan', 'master24')  # the roundings that keep a buffer beside each 16-bit param
SEEDED = ('stochastic', 'master24')  # those that round at random
KAHAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
COMP = 'kahan_comp'  # the state key of the compensation buffer

# Significant bits and smallest normal exponent (as torch.frexp counts) of each 16-bit dtype.
_FORMAT = {torch.bfloat16: (8, -125), torch.float16: (11, -13)}


def check_rounding(rounding, kahan_dtype) -> None:
    "Raise `ValueError` naming the bad value."
    if rounding not in ROUNDINGS: raise ValueError(f"Invalid rounding: {rounding!r} (must be one of {ROUNDINGS})")
    if kahan_dtype not in KAHAN_DTYPES:
        raise ValueError(f"Invalid kahan_dtype: {kahan_dtype!r} (must be one of {KAHAN_DTYPES})")


def is_low_precision(dtype: torch.dtype) -> bool: return dtype in LOW_PRECISION


def stochastic_round(w: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """`w` (float32) rounded to `dtype` up or down at random, up with probability (w − down) / (up − down),
    given `noise`, 16 random bits per element (an integer tensor): unbiased to 2^-16 of an ulp.
    Non-finite values pass as they are.

    bfloat16 is float32's upper half: the noise is added to the lower half, which is then cut off. float16
    is rounded down to a multiple of its ulp and up with the probability above."""
    if dtype == torch.bfloat16:
        bits = w.view(torch.int32)
        rounded = ((bits + noise.to(torch.int32)) & -65536).view(torch.float32)
    else:
        mantissa, min_exp = _FORMAT[dtype]
        _, exponent = torch.frexp(w)
        ulp = torch.exp2((exponent.clamp_min(min_exp) - mantissa).to(w.dtype))
        down = torch.floor(w / ulp) * ulp
        rounded = down + ulp * (noise.to(w.dtype) * 2.0 ** -16 < (w - down) / ulp).to(w.dtype)
    return torch.where(torch.isfinite(w), rounded, w).to(dtype)


def random_bits(like: torch.Tensor) -> torch.Tensor:
    """16 random bits per element of `like`, from torch's generator: the foreach steps' noise. (Compiled updates
    hash each element's index with a seed instead, `fused.compile.hashed_bits`: inside a compiled loop that is
    several times faster than a generator, but eagerly it is ten passes over the tensor where this is one.)"""
    return torch.randint(0, 1 << 16, like.shape, dtype=torch.int32, device=like.device)


def hashed_noise(x: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits per element of float32 `x`: a multiplicative hash of its bits and those of `salt`
    (float32, `x`'s shape). The noise of the 16-bit state's
    stochastic rounding: a function of the data, so that a run resumed from a checkpoint rounds as the run
    straight through did, with no random state to carry; salted with the param's new value, which moves at
    every step, so that an average whose increment was rounded away once is not rounded the same way forever
    (under constant gradients its value alone would repeat)."""
    # One multiply in wrapping int32 arithmetic (vectorised; int64 products are not, and a murmur3 finaliser in
    # int64 made a fused bf16 Adam step 5x slower, eager foreach steps 6x): the product's upper half mixes
    # every bit of both values, the rounded-away ones included.
    return (((x.view(torch.int32) ^ (salt.view(torch.int32) * 0x2545F491)) * 0x2C1B3C6D) >> 16) & 0xFFFF


def state_value(x: torch.Tensor, dtype: torch.dtype, w: torch.Tensor) -> torch.Tensor:
    """float32 state value `x` as it is written into state of `dtype`: for 16-bit state, stochastically rounded
    with noise hashed from `x` and its param's new working value `w` (see `hashed_noise`; from `x` alone for
    state not shaped like its param, or a value 16 bits hold exactly: a few-bit format's scales)."""
    if dtype not in LOW_PRECISION: return x
    return stochastic_round(x, dtype, hashed_noise(x, w if w.shape == x.shape else x))


def kahan_split(w: torch.Tensor, dtype: torch.dtype, comp_dtype: torch.dtype, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` (float32) as (p, comp): p = w rounded to `dtype`, comp = w − p in `comp_dtype`; for an int8
    `comp_dtype`, a 24-bit master (`master_split`, its low byte rounded with `noise`)."""
    if comp_dtype == torch.int8: return master_split(w, noise)
    p = w.to(dtype)
    return p, (w - p.to(w.dtype)).to(comp_dtype)


def master_value(p: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """The float32 weight that 16-bit `p` and its buffer `comp` stand for: p + comp, or with an int8 buffer
    (24-bit masters, bfloat16 `p`) the bits of p followed by those of comp, exactly."""
    if comp.dtype != torch.int8: return p.float() + comp.float()
    return (p.float().view(torch.int32) + comp.to(torch.int32) * 256).view(torch.float32)


def master_split(w: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `w` as a 24-bit master (bfloat16, int8): w's lowest 8 bits rounded away with `noise` (integers
    in [0, 256): up with probability (what is cut off) / 256; None: to nearest), then the bf16 nearest to the
    rest and the 8 bits of it below the bf16's, a signed byte (the bf16 is rounded to nearest, so they lie
    in [−128, 127]). Non-finite values pass as they are, with a zero byte."""
    bits = (w.view(torch.int32) + (128 if noise is None else noise.to(torch.int32))) & -256
    high = (bits + 0x8000) & -65536
    finite = torch.isfinite(w)
    p = torch.where(finite, high.view(torch.float32), w).to(torch.bfloat16)
    # An arithmetic shift, not `// 256`: the same (a multiple of 256), but a compiled loop vectorises it.
    return p, torch.where(finite, (bits - high) >> 8, 0).to(torch.int8)


def correction(w: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The buffer, in `dtype`, that makes 16-bit `p` stand for float32 `w`: w − p; for int8 (24-bit masters)
    w − p in 1/256ths of p's ulp, rounded to nearest and clamped to [−128, 127] (p need not be w's nearest
    bf16 here: a correction made from a Kahan buffer or a float32 weight)."""
    if dtype != torch.int8: return (w - p.float()).to(dtype)
    # Counted in float32 steps between bit patterns, from a zero p given w's sign.
    base = p.float().view(torch.int32)
    base = torch.where(p == 0, w.view(torch.int32) & -0x80000000, base)
    steps = (w.view(torch.int32) - base).double() / 256
    return torch.where(torch.isfinite(w), steps.round().clamp(-128, 127), 0).to(torch.int8)


@dataclass(frozen=True)
class Rounding:
    "How an optimizer writes float32 updates back into 16-bit params (see the module docstring)."
    mode: str = 'kahan'
    kahan_dtype: torch.dtype = torch.float32

    def __post_init__(self): check_rounding(self.mode, self.kahan_dtype)

    @property
    def kahan(self) -> bool:
        "Whether 16-bit params keep a buffer of what rounding took off: Kahan's or a 24-bit master's."
        return self.mode in BUFFERED

    @property
    def comp_dtype(self) -> torch.dtype:
        "The dtype of the buffers: int8 for 24-bit masters, `kahan_dtype` for Kahan's."
        return torch.int8 if self.mode == 'master24' else self.kahan_dtype

    def check(self, p) -> None:
        "Raise `ValueError` for a param this rounding cannot step."
        if self.mode == 'master24' and p.dtype == torch.float16:
            raise ValueError("Invalid rounding: 'master24' with float16 params (24-bit masters split a float32 "
                             "into bfloat16 and a byte; use 'kahan' for float16)")

    def in_float32(self, p: torch.Tensor) -> bool:
        "Whether params like `p` are stepped on float32 working values (16 bits, Kahan or stochastic)."
        return p.dtype in LOW_PRECISION and self.mode != 'nearest'

    def compensations(self, origins, states) -> list[torch.Tensor] | None:
        "Each param's Kahan buffer (created as zeros, like its param, on its first step); None unless Kahan."
        if not self.kahan: return None
        for p, state in zip(origins, states):
            if COMP not in state: state[COMP] = torch.zeros_like(p, dtype=self.comp_dtype)
        return [state[COMP] for state in states]

    def working(self, params: list[torch.Tensor], comps) -> list[torch.Tensor]:
        "float32 working values: p + comp with Kahan, the master with 24-bit masters, p otherwise (new tensors)."
        if comps is not None and self.mode == 'master24': return [master_value(p, c) for p, c in zip(params, comps)]
        w = [p.float() for p in params]
        if comps is not None: torch._foreach_add_(w, comps)
        return w

    def update_in_float32(self, params: list[torch.Tensor], comps, update) -> None:
        """`update(w)` on the float32 working values `w` of 16-bit `params` (with their Kahan buffers `comps`,
        or None), then `w` written back into them as this rounding says: what moves a 16-bit param outside a
        step (Lookahead's sync, a schedule-free switch of modes) moves it as a step would."""
        w = self.working(params, comps)
        update(w)
        self.write_back(params, w, comps)

    def write_state(self, states: list[torch.Tensor], values: list[torch.Tensor], w: list[torch.Tensor]) -> None:
        "Each float32 value of a step's state into its state tensor, as `state_value` says."
        for s, x, wi in zip(states, values, w):
            if s is not x: s.copy_(state_value(x, s.dtype, wi))

    def write_back(self, params: list[torch.Tensor], w: list[torch.Tensor], comps) -> None:
        "Round each working value `w` into its param (and what rounding took off into its Kahan buffer)."
        if comps is not None and self.mode == 'master24':
            for p, c, x in zip(params, comps, w):
                p_new, c_new = master_split(x, random_bits(x) & 255)
                p.copy_(p_new)
                c.copy_(c_new)
        elif comps is not None:
            torch._foreach_copy_(params, w)
            torch._foreach_sub_(w, params)
            torch._foreach_copy_(comps, w)
        else:
            for p, x in zip(params, w): p.copy_(stochastic_round(x, p.dtype, random_bits(x)))
