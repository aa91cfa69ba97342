"""Blockwise 8-bit quantization (`fastforeach.quantize`): bitsandbytes' maps, codes and absmax exactly, and a
bound on every round trip's error (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastforeach.quantize import (BLOCKSIZE, dequantize_4bit, dequantize_blockwise, dynamic_map, linear_map, quantize_4bit,
                                   quantize_blockwise)


def bitsandbytes():
    return pytest.importorskip('bitsandbytes.functional', reason="bitsandbytes (its CPU backend) is not installed")


def cases():
    gen = torch.Generator().manual_seed(0)
    randn = lambda n: torch.randn(n, generator=gen)
    return {'normal': (randn(70_000), True), 'short tail': (randn(4096 + 17), True),
            'second moments': (randn(5000).pow(2) * 1e-4, False), 'a block of zeros': (torch.cat([torch.zeros(256), randn(600)]), True),
            'tiny': (randn(3000) * 1e-30, True), 'ties': (torch.randint(-3, 4, (2000,), generator=gen).float(), True),
            'matrix': (randn(96 * 80).view(96, 80), True), 'bf16': (randn(5000).bfloat16(), True)}


@pytest.mark.parametrize('signed', [True, False], ids=['signed', 'unsigned'])
def test_dynamic_maps_are_bitsandbytes(signed):
    F = bitsandbytes()
    assert torch.equal(dynamic_map(signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize('blocksize', [BLOCKSIZE, 128])
@pytest.mark.parametrize('case', list(cases()))
def test_codes_and_absmax_are_bitsandbytes(case, blocksize):
    "Codes, absmax and dequantized values equal bitsandbytes' CPU `quantize_blockwise` / `dequantize_blockwise`."
    F = bitsandbytes()
    x, signed = cases()[case]
    codes, absmax = quantize_blockwise(x, dynamic_map(signed), blocksize)
    theirs, state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed=signed), blocksize=blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(codes.reshape(-1), theirs.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    # bitsandbytes gives the values in the input's dtype
    assert torch.equal(dequantize_blockwise(codes, absmax, dynamic_map(signed), blocksize).to(x.dtype).reshape(-1),
                       F.dequantize_blockwise(theirs, state).reshape(-1))


def worst_error(map: torch.Tensor) -> float:
    """The most a value in [-1, 1] (in [0, 1] for an unsigned map) can be from the entry it is coded as: half
    the widest gap between entries, or the way from an end of the range to the entry nearest it, and half
    a bin of the table the codes are found by."""
    low = -1. if map.min() < 0 else 0.
    gaps = [(map[1:] - map[:-1]).max().item() / 2, map.min().item() - low, 1. - map.max().item()]
    return max(gaps) + 1 / 65535


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=700),
       signed=st.booleans(), blocksize=st.sampled_from([64, 128, 256]))
def test_round_trip_error_is_bounded(values, signed, blocksize):
    "Every element comes back within `worst_error` of the map times its block's absmax."
    x = torch.tensor(values)
    if not signed: x = x.abs()
    map = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, map, blocksize)
    back = dequantize_blockwise(codes, absmax, map, blocksize)
    scale = absmax.repeat_interleave(blocksize)[:x.numel()]
    assert torch.all((back - x).abs() <= worst_error(map) * scale * (1 + 1e-6) + 1e-38)
    assert absmax.numel() == -(-x.numel() // blocksize)


def torchao_4bit():
    return pytest.importorskip('torchao.optim.subclass_4bit', reason="torchao is not installed")


def test_4bit_maps_are_torchao():
    ao = torchao_4bit()
    assert torch.equal(dynamic_map(True, bits=4), torch.tensor(ao.get_qmap_signed()))
    assert torch.equal(linear_map(4), torch.tensor(ao.get_qmap_unsigned()))


@pytest.mark.parametrize('signed', [True, False], ids=['signed', 'unsigned'])
@pytest.mark.parametrize('case', ['normal', 'small matrix', 'zeros', 'ties'])
def test_4bit_codes_and_scales_are_torchao(case, signed):
    "Packed codes, scales and dequantized values equal torchao's `OptimState4bit` given the same tensor."
    ao = torchao_4bit()
    gen = torch.Generator().manual_seed(0)
    x = {'normal': torch.randn(128 * 40, generator=gen), 'small matrix': torch.randn(64, 256, generator=gen) * 1e-3,
         'zeros': torch.zeros(256), 'ties': torch.randint(-2, 3, (512,), generator=gen).float()}[case]
    if not signed: x = x.abs()
    theirs = ao.OptimState4bit.zeros(x.shape, signed=signed)
    theirs.copy_(x)
    map = dynamic_map(True, bits=4) if signed else linear_map(4)
    codes, scale = quantize_4bit(x, map)
    assert torch.equal(codes, theirs.codes) and torch.equal(scale, theirs.scale)
    assert torch.equal(dequantize_4bit(codes, scale, map, x.shape), theirs.dequantize())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=128, max_size=128 * 4),
       signed=st.booleans())
def test_4bit_round_trip_error_is_bounded(values, signed):
    "Every element comes back within half the widest gap of its map (or its distance to the map's ends) times its block's scale."
    x = torch.tensor(values[:len(values) // 128 * 128])
    map = dynamic_map(True, bits=4) if signed else linear_map(4)
    if not signed: x = x.abs()
    codes, scale = quantize_4bit(x, map)
    back = dequantize_4bit(codes, scale, map, x.shape)
    assert torch.all((back - x).abs() <= (worst_error(map) - 1 / 65535) * scale.repeat_interleave(128) * (1 + 1e-6))


def test_4bit_needs_whole_blocks():
    with pytest.raises(ValueError, match="Invalid tensor for 4-bit state: 100 elements"):
        quantize_4bit(torch.randn(100), linear_map(4))


def test_stochastic_codes_are_unbiased():
    """Stochastic rounding: each code is one of the two entries around the scaled value, and the mean of many
    roundings is the value (within 4 standard errors of a draw between the two)."""
    from fastforeach.quantize import quantize_stochastic
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, generator=gen)
    map, draws = dynamic_map(True), 4000
    nearest, absmax = quantize_blockwise(x, map)
    total = torch.zeros_like(x)
    for _ in range(draws):
        codes, same_absmax = quantize_stochastic(x, map, generator=gen)
        assert torch.equal(same_absmax, absmax) and ((codes.long() - nearest.long()).abs() <= 1).all()
        total += dequantize_blockwise(codes, absmax, map)
    gap = (map[1:] - map[:-1]).max() * absmax.max()
    assert ((total / draws - x).abs() <= 4 * gap / 2 / draws ** 0.5).all()


def test_stochastic_codes_keep_small_increments_of_an_average():
    """An exponential average with β = 0.999 of gradients 1 ± 0.5, kept in 8-bit codes and rewritten at every
    step: rounding to nearest drops each 0.1% increment, stochastic rounding keeps it in expectation."""
    from fastforeach.quantize import quantize_stochastic
    gen = torch.Generator().manual_seed(0)
    map, n, beta = dynamic_map(False), 4096, 0.999
    exact = torch.full((n,), 0.5, dtype=torch.float64)
    kept = {k: quantize_blockwise(exact.float(), map) for k in ('nearest', 'stochastic')}
    for _ in range(1000):
        g = 1 + 0.5 * (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)
        exact = beta * exact + (1 - beta) * g
        for kind, (codes, absmax) in kept.items():
            value = beta * dequantize_blockwise(codes, absmax, map) + (1 - beta) * g.float()
            kept[kind] = quantize_blockwise(value, map) if kind == 'nearest' else quantize_stochastic(value, map, generator=gen)
    means = {k: dequantize_blockwise(c, a, map).double().mean().item() for k, (c, a) in kept.items()}
    target = exact.mean().item()
    assert abs(means['stochastic'] - target) < 0.01 * target
    assert abs(means['nearest'] - target) > 0.05 * target  # stuck near where it started


def _loop_codes(x: torch.Tensor, signed: bool, bits: int, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded values) of rows `x` by the compiled loop's coders (`encode_rows`, `encode_rows_4bit`), run
    eagerly; to nearest without `noise`."""
    from fastforeach.quantize import (bin_table, decode_rows, decode_rows_4bit, encode_rows, encode_rows_4bit)
    if bits == 8:
        map = dynamic_map(signed)
        codes, absmax = encode_rows(x, map, bin_table(map), noise)
        return codes, decode_rows(codes, absmax, map)
    map = dynamic_map(True, 4) if signed else linear_map(4)
    codes, scales = encode_rows_4bit(x, map, tuple(map.tolist()), noise)
    return torch.stack([codes >> 4, codes & 15], dim=-1).view(x.shape), decode_rows_4bit(codes, scales, map)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=128, max_size=128),
       signed=st.booleans(), bits=st.sampled_from([8, 4]), noise=st.sampled_from([0, 1, 32768, 65535]))
def test_loop_stochastic_codes_are_next_to_the_value(values, signed, bits, noise):
    """The compiled loop's stochastic codes, whatever the noise, stand for an entry next to the value: within the
    map's widest gap (and a bin of the 8-bit table) times the block's largest, never off the map's ends (a
    block's largest value negative scales to −1, below the signed map's least entry −0.993: no entry lies
    beyond it)."""
    x = torch.tensor(values).view(1, -1)
    if not signed: x = x.abs()
    _, back = _loop_codes(x, signed, bits, torch.full(x.shape, noise, dtype=torch.int32))
    map = dynamic_map(signed, bits) if signed or bits == 8 else linear_map(4)
    bound = ((map[1:] - map[:-1]).max() + 2 / 65535) * x.abs().max()
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('signed', [True, False], ids=['signed', 'unsigned'])
def test_loop_stochastic_codes_are_unbiased(signed, bits):
    """The compiled loop's stochastic codes, over many noises, average to the value (within 4 standard errors of
    a draw between the two entries around it), for values in the map's range: each block's largest value is
    negative (it scales to −1, beyond the signed maps' least entries: it takes that entry), one block is of
    zeros, and second moments below the 4-bit linear map's least entry take it."""
    gen = torch.Generator().manual_seed(0)
    block = 256 if bits == 8 else 128
    x = torch.randn(6, block, generator=gen) * torch.logspace(-4, 0, 6).view(-1, 1)
    x[:, 0] = -x.abs().amax(dim=1) * 1.5
    x[5] = 0.
    if not signed: x = x.abs()
    total, draws = torch.zeros_like(x), 3000
    for _ in range(draws):
        total += _loop_codes(x, signed, bits, torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32))[1]
    map = dynamic_map(signed, bits) if signed or bits == 8 else linear_map(4)
    largest = x.abs().amax(dim=1, keepdim=True)
    gap = (map[1:] - map[:-1]).max() * largest
    scaled = x / largest.clamp_min(1e-30)
    kept = (scaled >= map[0]) & (scaled <= map[-1])
    assert kept.float().mean() > 0.5
    assert ((total / draws - x).abs() <= 4 * gap / 2 / draws ** 0.5)[kept].all()


def _companded(x, nonnegative, noise=None):
    from fastforeach.lowbit import FORMATS
    fmt = FORMATS['8bit-companded']
    rows = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % fmt.blocksize)).view(-1, fmt.blocksize)
    from fastforeach.quantize import companded_decode_rows, companded_encode_rows
    codes, scales = companded_encode_rows(rows, nonnegative, noise)
    return codes, scales, companded_decode_rows(codes, scales, nonnegative).reshape(-1)[:x.numel()], rows


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-2. ** 100, 2. ** 100, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=700),
       nonnegative=st.booleans())
def test_companded_round_trip_error_is_bounded(values, nonnegative):
    """Companded 8-bit codes (square roots of values relative to their block's largest, bfloat16 scales): every
    element comes back within half a level's spacing at the top, 1/127 (1/256 for second moments) of its
    block's largest, and a second moment never comes back 0 unless its whole block is."""
    x = torch.tensor(values)
    if nonnegative: x = x.abs()
    codes, scales, back, rows = _companded(x, nonnegative)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.bfloat16
    largest = rows.abs().amax(dim=1, keepdim=True).expand_as(rows).reshape(-1)[:x.numel()]
    assert torch.all((back - x).abs() <= (1 / 256 if nonnegative else 1 / 127) * largest * (1 + 1e-2) + 1e-38)
    if nonnegative: assert torch.all((back > 0) | (largest == 0))


@pytest.mark.parametrize('nonnegative', [False, True], ids=['signed', 'second moments'])
def test_companded_stochastic_codes_are_unbiased(nonnegative):
    """Stochastic companded codes: one of the two levels around the value, their mean over many draws the
    value (within 4 standard errors of a draw between the two; second moments below the least level
    aside: they take it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, generator=gen) * torch.rand(8, 1, generator=gen).expand(8, 64).reshape(-1)
    if nonnegative: x = x * x
    nearest, _, _, _ = _companded(x, nonnegative)
    total, draws = torch.zeros_like(x), 4000
    for _ in range(draws):
        codes, _, back, rows = _companded(x, nonnegative, torch.randint(0, 1 << 16, (8, 64), generator=gen, dtype=torch.int32))
        assert ((codes.long() - nearest.long()).abs() <= 1).all()
        total += back
    largest = rows.abs().amax(dim=1, keepdim=True).expand_as(rows).reshape(-1)
    gap = 2 * largest / (256 if nonnegative else 127)  # the widest spacing of two levels, at the top
    kept = x >= largest * (1 / 256) ** 2 if nonnegative else torch.ones_like(x, dtype=torch.bool)
    assert ((total / draws - x).abs() <= 4 * gap / 2 / draws ** 0.5)[kept].all()
