"""The optimizers fastai lacks, against their published implementations (see `fastforeach.testing.references`).

fastforeach's foreach and fused forms, and the fastai-style per-param optimizer that stands in for fastai's
own in every other test (`REGISTRY[name].native`), each run beside the reference on identical copies of the
oracle's layers: two fastai groups (the reference gets each split by `do_wd`, weight decay 0 for norm and
bias params), a param that never gets a gradient, fresh gradients and a new lr per group every step,
100 steps, float64. Params and every state tensor (mapped to the reference's keys) equal to 1e-10
relative: the same math in a different order, an ulp or so per op (see tests/test_oracle.py).
"""
import math

import pytest
import torch
from torch import nn

from fastforeach.testing.oracle import oracle_layers
from fastforeach.testing.references import REFERENCES, reference_groups
from fastforeach.registry import REGISTRY

pytest.importorskip('optimi', reason='torch-optimi is a test dependency: pip install -e ".[test]"')

CASES = [pytest.param(name, cfg, options, id=f"{name}-{cfg}")
         for name in REFERENCES for cfg, options in REGISTRY[name].configs.items()
         if options.get('decouple_wd', True) and options.get('adjust_lr') != 'none']  # no L2, nor unadjusted Muon
CHECKPOINTS = (1, 2, 10, 100)


def no_wd(p): return p.ndim <= 1  # as fastai's Learner marks norm and bias params


def run_beside_reference(name, impl, options, steps=100, dtype=torch.float64, foreach=False):
    spec, ref = REGISTRY[name], REFERENCES[name]
    groups = oracle_layers(dtype)
    ours = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    theirs = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    opt = spec.make(impl, ours, **options)
    for p in (p for g in ours for p in g):
        if no_wd(p): opt.state[p]['do_wd'] = False
    torch_groups = reference_groups(theirs, lambda p: not no_wd(p))
    reference = ref.build(torch_groups, spec.lr, foreach, **{**spec.make_options, **options})
    gen = torch.Generator().manual_seed(0)
    pairs = [(a, b) for ga, gb in zip(ours, theirs) for a, b in zip(ga, gb)][:-1]  # the last gets no gradient
    clipped = 0
    for t in range(1, steps + 1):
        for a, b in pairs:
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.1
            a.grad, b.grad = g.clone(), g.clone()
        lrs = [spec.lr * (1 + 0.5 * math.sin(t / 7)) / 3 ** (len(groups) - 1 - i) for i in range(len(groups))]
        opt.set_hyper('lr', lrs)
        for group in reference.param_groups: group['lr'] = lrs[group['fastai_group']]
        opt.step()
        reference.step()
        if t in CHECKPOINTS: assert_equal(name, opt, reference, pairs, options, t)
    return opt, reference, pairs


def assert_equal(name, opt, reference, pairs, options, t):
    tol = dict(rtol=1e-10, atol=1e-12)
    state_map = REFERENCES[name].state
    for i, (a, b) in enumerate(pairs):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"param {i} after {t} steps: {m}")
        ours, theirs = opt.state[a], reference.state[b]
        step = ours.get('step', t)
        for key, (their_keys, to_ours) in state_map.items():
            there = [k for k in ((their_keys,) if isinstance(their_keys, str) else their_keys) if k in theirs]
            assert (key in ours) == bool(there), f"param {i}: state {key!r} in one of them only"
            if key not in ours: continue
            value = to_ours(theirs[there[0]], step, options).reshape(ours[key].shape)
            torch.testing.assert_close(ours[key], value, **tol, msg=lambda m: f"param {i} state {key!r} after {t} steps: {m}")


@pytest.mark.parametrize('impl', ['native', 'foreach', 'fused'])
@pytest.mark.parametrize('name,cfg,options', CASES)
def test_equals_the_reference(name, cfg, options, impl):
    run_beside_reference(name, impl, options)


@pytest.mark.parametrize('name', list(REFERENCES))
def test_the_references_foreach_mode_agrees_too(name):
    "The benchmark times the reference's foreach mode: the same results as its per-param mode."
    run_beside_reference(name, 'foreach', {}, steps=10, foreach=True)


def test_stable_adam_clips_in_the_oracle_run():
    "The oracle's random gradients take StableAdam through both branches: clipped steps and plain ones."
    from fastforeach.optimizers.stableadam import native_stable_adam
    p = nn.Parameter(torch.zeros(100, dtype=torch.float64))
    opt = native_stable_adam([p], 1e-3)
    gen, ratios = torch.Generator().manual_seed(0), []
    for _ in range(30):
        p.grad = torch.randn(100, generator=gen, dtype=torch.float64) * 0.1
        before = p.detach().clone()
        opt.step()
        state = opt.state[p]
        v_hat = state['sqr_avg'] / (1 - 0.99 ** state['step'])
        ratios.append((p.grad.pow(2) / v_hat.clamp_min(1e-12)).mean().sqrt().item())
        assert not torch.equal(before, p.detach())
    assert min(ratios) < 1 < max(ratios)


@pytest.mark.parametrize('impl', ['native', 'foreach', 'fused'])
def test_schedule_free_eval_and_train_modes_follow_the_reference(impl):
    "eval() puts the averaged weights x in the params, train() y again, as schedulefree's AdamWScheduleFree does."
    opt, reference, pairs = run_beside_reference('ScheduleFreeAdam', impl, REGISTRY['ScheduleFreeAdam'].configs['warmup'],
                                                 steps=20)
    y = [a.detach().clone() for a, _ in pairs]
    for mode in ('eval', 'train', 'eval'):
        getattr(opt, mode)(), getattr(reference, mode)()
        for a, b in pairs: torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
    assert not any(torch.equal(a.detach(), b) for (a, _), b in zip(pairs, y))  # x is not y
    with pytest.raises(ValueError, match='eval mode'): opt.step()
    opt.train()
    for (a, _), b in zip(pairs, y): torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
def test_muon_in_bf16_as_torch_runs_it(impl):
    """Newton-Schulz in bf16 (the default dtype), the standard iteration as torch.optim.Muon runs it.
    fastforeach iterates equal shapes together (batched matmuls), torch one matrix at a time: bf16 rounding
    differs, so the updates agree to bf16's precision (one step, relative to each param's move), not to
    float64's."""
    from fastforeach.testing.references import reference_groups
    spec, ref = REGISTRY['Muon'], REFERENCES['Muon']
    groups = oracle_layers(torch.float64)
    ours = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    theirs = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    opt = spec.make(impl, ours, wd=0., ns_dtype=torch.bfloat16, ns_method='standard')
    reference = ref.build(reference_groups(theirs, lambda p: True), spec.lr, False, wd=0., ns_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for a, b in list(zip([p for g in ours for p in g], [p for g in theirs for p in g]))[:-1]:
        a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        b.grad = a.grad.clone()
    start = [p.detach().clone() for g in ours for p in g]
    opt.step(); reference.step()
    for s, a, b in zip(start, [p for g in ours for p in g], [p for g in theirs for p in g]):
        move = (b.detach() - s).abs().max()
        if move == 0: continue
        assert (a.detach() - b.detach()).abs().max() <= 2e-2 * move


@pytest.mark.parametrize('shape', [(64, 576), (256, 1024), (1152, 128)])
@pytest.mark.parametrize('decay', [0., 0.5, 1., 2.])
def test_gram_iteration_in_bf16_is_as_close_to_the_exact_iteration_as_torchs(shape, decay):
    """The Gram iteration (the default) is the standard one's polynomial, equal in float64 (the tests above);
    in bf16 it rounds differently. Against the iteration in float64, on matrices with singular values
    k^-decay (decay 0: a Gaussian matrix), its relative error is at most torch's bf16 error plus 0.05
    (measured up to 0.033 more; without restarts, errors grow past 1)."""
    import torch.optim._muon as torch_muon
    from fastforeach.optimizers.muon import NS_COEFFICIENTS, orthogonalize_one
    gen = torch.Generator().manual_seed(0)
    m, n = sorted(shape)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if decay:
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
        g = u @ torch.diag(torch.arange(1, m + 1, dtype=torch.float64) ** -decay) @ v.T
    if shape[0] > shape[1]: g = g.T
    exact = orthogonalize_one(g, 5, torch.float64, 'standard')
    def error(x): return ((x.double() - exact).norm() / exact.norm()).item()
    torchs = error(torch_muon._zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7))
    gram = error(orthogonalize_one(g, 5, torch.bfloat16, 'gram'))
    assert gram <= torchs + 0.05
