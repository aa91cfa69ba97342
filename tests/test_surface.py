"""The factories as a user calls them: per-group hypers given as lists and slices at construction, over
several param groups, foreach and fused, in float32 and in bf16 with `rounding='nearest'` (fastai's own
steps, bit for bit). Each is held to the factory's `foreach=False` form (fastai's optimizer, or the
fastai-style one of the optimizers fastai lacks) built with the same arguments."""
import pytest
import torch

import fastforeach

NAMES = [*fastforeach.OWN, *fastforeach.MODERN]
NAMES.remove('Lookahead')  # wraps an optimizer: its groups and hypers are the inner one's
LRS = {'list': [1e-3, 2e-3, 3e-3], 'slice': slice(1e-4, 1e-2)}
# Muon's Newton-Schulz in float64, where its batched and one-at-a-time forms agree (see the registry).
OPTIONS = {'Muon': {'ns_dtype': torch.float64}}


def three_groups(dtype, seed=0):
    "A conv kernel and its bias, a matrix and a vector, a head: three param groups, with gradients."
    g = torch.Generator().manual_seed(seed)
    shapes = [[(8, 3, 3, 3), (8,)], [(16, 72), (16,)], [(4, 16)]]
    groups = [[torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in pg] for pg in shapes]
    for pg in groups:
        for p in pg: p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return groups


def build(name, impl, lr, dtype, **options):
    groups = three_groups(dtype)
    factory = getattr(fastforeach, name)
    switches = {'foreach': False} if impl == 'native' else {'fused': impl == 'fused'}
    return factory(groups, lr=lr, **OPTIONS.get(name, {}), **options, **switches), groups


@pytest.mark.parametrize('lr', LRS.values(), ids=LRS.keys())
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', NAMES)
def test_per_group_lrs_at_construction(name, impl, lr):
    "Lists and slices of lrs spread over the groups as fastai spreads them, and step as fastai's optimizer does."
    ours, ours_groups = build(name, impl, lr, torch.float32)
    native, native_groups = build(name, 'native', lr, torch.float32)
    assert len(ours.param_lists) == 3
    assert ours.hypers.attrgot('lr') == native.hypers.attrgot('lr')
    for _ in range(2): ours.step(); native.step()
    for pa, pb in zip(sum(ours_groups, []), sum(native_groups, [])):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', NAMES)
def test_per_group_lrs_bf16_nearest(name, impl):
    "bf16 params with `rounding='nearest'` are stepped by fastai's own steppers: bit for bit, with per-group lrs."
    ours, ours_groups = build(name, impl, LRS['list'], torch.bfloat16, rounding='nearest')
    native, native_groups = build(name, 'native', LRS['list'], torch.bfloat16)
    for _ in range(2): ours.step(); native.step()
    for pa, pb in zip(sum(ours_groups, []), sum(native_groups, [])): assert torch.equal(pa, pb)
