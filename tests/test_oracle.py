"""The oracle: every fastforeach optimizer against fastai's native one, row by row of the registry.

Tolerances. Both sides do the same math in the same dtype, but not always in the same order: foreach
Adam-style averages use `lerp` (one rounding) where fastai does `mul_` then `add_` (two), LAMB takes the
RMS as ‖x‖/√n where fastai takes √mean(x²), and Larc/Lamb scale by a 0-d tensor where fastai converts it
to a Python float first. Each of those is a difference of an ulp or so per op; over 100 steps they stay
within a few hundred ulps. float64 has a 1e-16 ulp, so 1e-10 is tight; float32 has a 6e-8 ulp, and
quantities such as Adam's update divide by √sqr_avg, which amplifies relative error where sqr_avg is
tiny, hence 1e-4 relative with a 1e-6 floor.

The fused steps are held to the same tolerances: PyTorch's fused Adam takes √v/√debias2 where fastai takes
√(v/debias2), and compiled updates let the C++ compiler contract a·b + c into one fused multiply-add;
both are again an ulp per op (measured: at most 6e-16 relative in float64 and 3e-7 in float32 after 100
steps, the same as foreach).
"""
import pytest
import torch

from fastforeach.testing.cases import compiled_optimizers
from fastforeach.testing.oracle import Twins, oracle_layers
from fastforeach.core import inner_optimizer
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


def against_fastai(spec, impl, groups, mark_no_wd=True, **options) -> Twins:
    "Twins of fastai's native optimizer and `impl`'s, both built with `options`, on copies of `groups`."
    return Twins(lambda ps: spec.make('native', ps, **options), lambda ps: spec.make(impl, ps, **options), groups,
                 mark_no_wd=mark_no_wd)


def run_oracle(spec, options, dtype, impl='foreach', steps=100, device='cpu'):
    twins = against_fastai(spec, impl, oracle_layers(dtype, device), **options)
    for t in range(1, steps + 1):
        twins.step(spec.lr)
        if t in CHECKPOINTS: assert_twins_equal(twins, dtype, t)
    return twins


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('spec,options', CASES)
def test_equals_fastai(spec, options, dtype, impl):
    twins = run_oracle(spec, options, dtype, impl)
    # The harness really moved the params and really skipped the one without a gradient.
    (_, moved, _), *_ = twins.pairs()
    assert not torch.equal(moved, oracle_layers(dtype)[0][0])
    gi, pi = twins.no_grad
    assert torch.equal(twins.params_b[gi][pi], oracle_layers(dtype)[gi][pi])
    assert set(twins.opt_b.state[twins.params_b[gi][pi]]) <= {'do_wd'}


def test_fused_steps_are_fused():
    "`fused=True` really builds the fused form (a kernel or a compiled update) for every row."
    from fastforeach.fused import FusedStep
    for name, spec in REGISTRY.items():
        for options in spec.configs.values():
            opt = spec.make('fused', oracle_layers()[0], **options)
            inner = inner_optimizer(opt)
            assert inner.fused_steps and all(isinstance(f, FusedStep) for f in inner.fused_steps), name
            foreach = spec.make('foreach', oracle_layers()[0], **options)
            assert not inner_optimizer(foreach).fused_steps, name


@pytest.mark.parametrize('name', compiled_optimizers())
def test_fused_chunks_equal_fastai(name):
    """Enough params per group for whole chunks of the compiled update (the oracle's groups are smaller):
    large ones, stepped per tensor, between small ones, packed."""
    from fastforeach.fused import CHUNK, PACK_MAX_NUMEL
    largest_packed = PACK_MAX_NUMEL['cpu']
    spec = REGISTRY[name]
    torch.manual_seed(0)
    large = [torch.nn.Parameter(torch.randn(largest_packed // 64 + i, 65)) for i in range(2 * CHUNK + 3)]
    small = [torch.nn.Parameter(torch.randn(3 + i, 5 + i)) for i in range(2 * CHUNK + 3)]
    layers = [[p for pair in zip(large, small) for p in pair], [torch.nn.Parameter(torch.randn(7 + i)) for i in range(CHUNK)]]
    twins = against_fastai(spec, 'fused', layers, wd=0.01)
    for t in range(1, 21):
        twins.step(spec.lr)
        if t in CHECKPOINTS: assert_twins_equal(twins, torch.float32, t)


@pytest.mark.cuda
@pytest.mark.parametrize('impl', ['foreach', 'fused', 'fused-per-tensor'])
@pytest.mark.parametrize('spec,options', CASES)
def test_equals_fastai_on_cuda(spec, options, impl, monkeypatch):
    "fused packs every oracle param on CUDA; fused-per-tensor packs only those the CPU would."
    from fastforeach import fused
    if impl == 'fused-per-tensor': monkeypatch.setitem(fused.PACK_MAX_NUMEL, 'cuda', fused.PACK_MAX_NUMEL['cpu'])
    run_oracle(spec, options, torch.float32, impl.removesuffix('-per-tensor'), device='cuda')


def test_every_factory_option_is_exercised():
    "The configs of each row use every option fastai's factory has (besides params and lr)."
    import inspect
    for name, spec in REGISTRY.items():
        options = set(inspect.signature(spec.native).parameters) - {'params', 'lr', 'kwargs'}
        if name == 'Lookahead': options = {'k', 'alpha', 'mom', 'wd'}
        used = {k for cfg in spec.configs.values() for k in cfg}
        assert options <= used, f"{name}: options never tested: {options - used}"
