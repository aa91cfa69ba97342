"""Checkpoints move between fastai and fastforeach, and what fastforeach does beyond fastai."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastforeach
from fastforeach.testing.oracle import Twins, compare_states, oracle_layers
from fastforeach.registry import REGISTRY
from test_oracle import TOLERANCES, against_fastai, assert_twins_equal

CASES = [pytest.param(spec, options, id=f"{name}-{cfg}")
         for name, spec in REGISTRY.items() for cfg, options in spec.configs.items()]


@pytest.mark.parametrize('direction', ['native_to_foreach', 'foreach_to_native', 'native_to_fused', 'fused_to_native'])
@pytest.mark.parametrize('spec,options', CASES)
def test_state_dict_interchange(spec, options, direction):
    """Run the saving side 7 steps, load its state dict (through torch.save) into a fresh optimizer of the
    other side, then both go on for 13 steps beside an uninterrupted optimizer of the loading side's kind."""
    saver, loader = direction.split('_to_')
    dtype = torch.float64
    twins = Twins(lambda ps: spec.make(saver, ps, **options), lambda ps: spec.make(loader, ps, **options),
                  oracle_layers(dtype))
    for _ in range(7): twins.step(spec.lr)
    # The loader side starts again from the saver's params and state.
    for _, pa, pb in twins.pairs(): pb.data.copy_(pa.data)
    buffer = io.BytesIO()
    torch.save(twins.opt_a.state_dict(), buffer)
    buffer.seek(0)
    fresh = spec.make(loader, twins.params_b, **options)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    twins.opt_b = fresh
    for _ in range(13): twins.step(spec.lr)
    assert_twins_equal(twins, dtype, 'a checkpoint and 13')


def _fresh_grads(opt, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in opt.all_params(with_grad=False).itemgot(0)[:-1]:  # the last param never gets one
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


COPIES = {'pickle': lambda opt: pickle.loads(pickle.dumps(opt)), 'deepcopy': copy.deepcopy}


@pytest.mark.parametrize('how', COPIES)
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('spec,options', CASES)
def test_copied_optimizer_goes_on_as_the_original(spec, options, impl, how):
    """An optimizer pickled (as `torch.save(learn)` does) or deep-copied (`copy.deepcopy(learn)`) mid-run owns
    copies of the params and state, and steps exactly as the original from there: the fused steps' cached
    operands must not follow it and go on writing into the original's tensors."""
    opt = spec.make(impl, oracle_layers(torch.float64), **options)
    for seed in range(3): _fresh_grads(opt, seed); opt.step()
    twin = COPIES[how](opt)
    params, copied = (o.all_params(with_grad=False).itemgot(0) for o in (opt, twin))
    assert not any(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(params, copied))
    for seed in range(3, 6):
        for o in (opt, twin): _fresh_grads(o, seed); o.step()
    for i, (a, b) in enumerate(zip(params, copied)): assert torch.equal(a, b), f"param {i}"
    for where, a, b in compare_states(opt.state_dict(), twin.state_dict()):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), where


def test_closure_is_called_with_grad_and_its_loss_returned():
    model = nn.Linear(3, 1)
    opt = fastforeach.Adam(model.parameters(), 1e-2)
    x = torch.randn(8, 3)
    seen = {}

    def closure():
        seen['grad_enabled'] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad(): loss = opt.step(closure)
    assert seen['grad_enabled'] and isinstance(loss, torch.Tensor)
    assert opt.state[model.weight]['step'] == 1


@pytest.mark.parametrize('name,impl', [(n, 'foreach') for n in ['SGD', 'Adam', 'Lamb', 'Larc', 'ranger']] +
                         [(n, 'fused') for n in ['SGD', 'Adam', 'Lamb']])
def test_group_mixing_dtypes_is_bucketed(name, impl):
    """float32, float64 and bfloat16 params in one group, each compared with fastai native in its own dtype:
    bf16 with rounding='nearest', fastai's own steps, bit for bit (Kahan, the default, is tested apart)."""
    spec = REGISTRY[name]
    layers = oracle_layers(torch.float64)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    mixed = [[p.detach().to(dtypes[i % 3]) for i, p in enumerate(g)] for g in layers]
    twins = Twins(lambda ps: spec.make('native', ps), lambda ps: spec.make(impl, ps, rounding='nearest'), mixed)
    for _ in range(20): twins.step(spec.lr)
    loose = {torch.float64: TOLERANCES[torch.float64], torch.float32: TOLERANCES[torch.float32],
             torch.bfloat16: dict(rtol=0, atol=0)}
    for where, pa, pb in twins.pairs():
        torch.testing.assert_close(pb, pa, **loose[pa.dtype], msg=str(where))
    for p in (p for g in twins.params_b for p in g[:-1]):
        for key, t in twins.opt_b.state[p].items():
            if key in ('grad_avg', 'sqr_avg'): assert t.dtype == p.dtype


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', ['Adam', 'RAdam'])
def test_group_mixing_dtypes_and_step_counts_is_bucketed(name, impl):
    """One group of float32 and float64 params, some of which get their first gradient steps after the
    others: a step splits it by dtype and by step count at once (each param debiases with its own count).
    Each param equals fastai's in its own dtype, and counts its own steps."""
    spec = REGISTRY[name]
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (300, 40), (2, 2, 3), (7,), (64, 70)]
    dtypes = [torch.float32, torch.float64] * 3
    first_step = [0, 2, 0, 3, 2, 5]  # when each param first has a gradient
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    params = {kind: [nn.Parameter(t.clone()) for t in init] for kind in ('native', impl)}
    opts = {kind: spec.make(kind, ps) for kind, ps in params.items()}
    for t in range(10):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for ps in params.values():
            for p, g, first in zip(ps, grads, first_step): p.grad = g.to(p.dtype) if t >= first else None
        for opt in opts.values(): opt.step()
    for i, (a, b) in enumerate(zip(params['native'], params[impl])):
        torch.testing.assert_close(b, a, **TOLERANCES[a.dtype], msg=f"param {i}")
        assert opts[impl].state[b]['step'] == opts['native'].state[a]['step'] == 10 - first_step[i]


@pytest.mark.cuda
def test_group_mixing_devices_is_bucketed():
    spec = REGISTRY['Adam']
    layers = oracle_layers(torch.float32)
    mixed = [[p.detach().to('cuda' if i % 2 else 'cpu') for i, p in enumerate(g)] for g in layers]
    twins = against_fastai(spec, 'foreach', mixed)
    for _ in range(20): twins.step(spec.lr)
    assert_twins_equal(twins, torch.float32, 20)


def test_empty_group_and_no_gradients_are_no_ops():
    layers = oracle_layers(torch.float64)
    opt = fastforeach.Adam([layers[0], [], layers[1]], 1e-3)
    before = [p.detach().clone() for g in layers for p in g]
    opt.step()  # no gradients at all
    assert all(torch.equal(a, b) for a, b in zip(before, (p for g in layers for p in g)))
    assert all(not opt.state[p] for g in layers for p in g)
    for p in layers[1]: p.grad = torch.randn_like(p)
    opt.step()  # group 0 and the empty group have nothing to do
    assert all(torch.equal(a, b) for a, b in zip(before, layers[0]))
    assert all(opt.state[p]['step'] == 1 for p in layers[1])
