"""The oracle: every fastforeach optimizer against fastai's native one, row by row of the registry.

Tolerances. Both sides do the same math in the same dtype, but not always in the same order: foreach
Adam-style averages use `lerp` (one rounding) where fastai does `mul_` then `add_` (two), LAMB takes the
RMS as ‖x‖/√n where fastai takes √mean(x²), and Larc/Lamb scale by a 0-d tensor where fastai converts it
to a Python float first. Each of those is a difference of an ulp or so per op; over 100 steps they stay
within a few hundred ulps. float64 has a 1e-16 ulp, so 1e-10 is tight; float32 has a 6e-8 ulp, and
quantities such as Adam's update divide by √sqr_avg, which amplifies relative error where sqr_avg is
tiny, hence 1e-4 relative with a 1e-6 floor.
"""
import pytest
import torch

from fastforeach.oracle import Twins, oracle_layers
from fastforeach.registry import REGISTRY

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}
CHECKPOINTS = (1, 2, 5, 20, 100)

CASES = [pytest.param(spec, options, id=f"{name}-{cfg}")
         for name, spec in REGISTRY.items() for cfg, options in spec.configs.items()]


def assert_twins_equal(twins, dtype, when):
    for label, a, b in twins.compared():
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            torch.testing.assert_close(torch.as_tensor(a, dtype=dtype), torch.as_tensor(b, dtype=dtype),
                                       **TOLERANCES[dtype], msg=lambda m: f"{label} after {when} steps: {m}")
        else:
            assert a == b, f"{label} after {when} steps: {a!r} != {b!r}"


def run_oracle(spec, options, dtype, impl='foreach', steps=100, device='cpu'):
    twins = Twins(lambda ps: spec.make('native', ps, **options), lambda ps: spec.make(impl, ps, **options),
                  oracle_layers(dtype, device))
    for t in range(1, steps + 1):
        twins.step(spec.lr)
        if t in CHECKPOINTS: assert_twins_equal(twins, dtype, t)
    return twins


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('spec,options', CASES)
def test_foreach_equals_fastai(spec, options, dtype):
    twins = run_oracle(spec, options, dtype)
    # The harness really moved the params and really skipped the one without a gradient.
    (_, moved, _), *_ = twins.pairs()
    assert not torch.equal(moved, oracle_layers(dtype)[0][0])
    gi, pi = twins.no_grad
    assert torch.equal(twins.params_b[gi][pi], oracle_layers(dtype)[gi][pi])
    assert set(twins.opt_b.state[twins.params_b[gi][pi]]) <= {'do_wd'}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize('spec,options', CASES)
def test_foreach_equals_fastai_on_cuda(spec, options):
    run_oracle(spec, options, torch.float32, device='cuda')


def test_every_factory_option_is_exercised():
    "The configs of each row use every option fastai's factory has (besides params and lr)."
    import inspect
    for name, spec in REGISTRY.items():
        options = set(inspect.signature(spec.native).parameters) - {'params', 'lr', 'kwargs'}
        if name == 'Lookahead': options = {'k', 'alpha', 'mom', 'wd'}
        used = {k for cfg in spec.configs.values() for k in cfg}
        assert options <= used, f"{name}: options never tested: {options - used}"
