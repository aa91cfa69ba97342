"""Real training with fastai's Learner: every fastforeach optimizer against fastai's native one of the same
kind, same seeds, same data order. Runs are float32 through a CNN, so an ulp of difference in a step can
grow through later forward and backward passes: 1e-3 relative (1e-5 absolute) after a few dozen batches
is still far below any difference between two genuinely different optimizers (the last test checks that).

Where a training run is more sensitive than that (StableAdam's update clipping on digits: fastai's own run
moves 2.5% of its weights' scale when its initial weights move by one ulp, where Adam's moves 1e-5),
fastforeach's run must stay within twice what that one-ulp nudge does to fastai's own
(`assert_same_run`).
"""
import copy
from functools import partial

import pytest
import torch
from fastai.callback.training import GradientAccumulation

import fastforeach
from fastforeach.testing.oracle import compare_states
from fastforeach.registry import REGISTRY
from fastforeach.testing.training import digits_learner

OPTIMIZERS = list(REGISTRY)
TOL = dict(rtol=1e-3, atol=1e-5)


def make_opt(name, impl, params, lr):
    return REGISTRY[name].make(impl, params, lr)


def learner(name, impl, tmp_path, **kwargs):
    learn = digits_learner(partial(make_opt, name, impl), path=tmp_path, **kwargs)
    learn.recorder.train_metrics = False
    return learn


def assert_same_model(a, b):
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(pa.float(), pb.float(), **TOL, msg=lambda m: f"{name}: {m}")


def assert_same_opt_state(a, b):
    for label, x, y in compare_states(a.opt.state_dict(), b.opt.state_dict()):
        if isinstance(x, torch.Tensor): torch.testing.assert_close(x, torch.as_tensor(y).to(x), **TOL, msg=label)
        else: assert x == y, label


def twin_runs(name, tmp_path, train, impl='foreach', nudge=False, **kwargs):
    """The same `train(learn)` with fastai's native optimizer and with fastforeach's `impl` (with `nudge`: the
    second run's initial weights one ulp up)."""
    runs = []
    for i, impl in enumerate(('native', impl)):
        learn = learner(name, impl, tmp_path / f"{impl}{i}", **kwargs)
        if nudge and i:
            with torch.no_grad():
                for p in learn.model.parameters(): p.copy_(torch.nextafter(p, torch.full_like(p, float('inf'))))
        with learn.no_logging(), learn.no_bar(): train(learn)
        runs.append(learn)
    return runs


def distance(a, b) -> float:
    "The largest |x − y| / (atol / rtol + |y|) over the models' weights and the optimizers' state: TOL's measure."
    pairs = list(zip(a.model.state_dict().values(), b.model.state_dict().values()))
    pairs += [(x, torch.as_tensor(y)) for _, x, y in compare_states(a.opt.state_dict(), b.opt.state_dict())
              if isinstance(x, torch.Tensor) and x.is_floating_point()]
    scale = TOL['atol'] / TOL['rtol']
    return max(((x.double() - y.double()).abs() / (scale + y.double().abs())).max().item() for x, y in pairs if x.numel())


def assert_same_run(native, ours, name, tmp_path, train, impl, **kwargs):
    """`ours` ends where fastai's `native` run does, within TOL; or, where fastai's own run is more sensitive
    than that, within twice the distance a one-ulp nudge of the initial weights puts between two fastai runs."""
    try:
        assert_same_model(native, ours)
        assert_same_opt_state(native, ours)
    except AssertionError:
        chaos = distance(*twin_runs(name, tmp_path / 'nudged', train, 'native', nudge=True, **kwargs))
        assert distance(native, ours) <= max(2 * chaos, TOL['rtol']), (name, impl, distance(native, ours), chaos)


SCENARIOS = {
    'fit': lambda learn, lr: learn.fit(2, lr),
    'fit_one_cycle_slice': lambda learn, lr: learn.fit_one_cycle(2, lr_max=slice(lr / 10, lr)),
    'fine_tune': lambda learn, lr: learn.fine_tune(1, base_lr=lr, freeze_epochs=1),
}


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('scenario', list(SCENARIOS))
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_learner_scenarios(name, scenario, impl, tmp_path):
    def train(learn): SCENARIOS[scenario](learn, REGISTRY[name].lr)
    native, foreach = twin_runs(name, tmp_path, train, impl)
    assert isinstance(foreach.opt, (fastforeach.ForEachOptimizer, fastforeach.Lookahead))
    assert_same_run(native, foreach, name, tmp_path, train, impl)


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('wd_bn_bias,train_bn', [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize('name', ['SGD', 'Adam', 'Lamb'])
def test_wd_bn_bias_and_train_bn(name, wd_bn_bias, train_bn, impl, tmp_path):
    def train(learn): learn.fine_tune(1, base_lr=REGISTRY[name].lr, freeze_epochs=1, wd=0.1)
    native, foreach = twin_runs(name, tmp_path, train, impl, wd_bn_bias=wd_bn_bias, train_bn=train_bn)
    assert_same_model(native, foreach)
    bias = foreach.model[8].bias
    assert foreach.opt.state[bias].get('do_wd', True) == wd_bn_bias


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_gradient_accumulation(name, impl, tmp_path):
    def train(learn):
        learn.add_cb(GradientAccumulation(n_acc=128))
        learn.fit(1, REGISTRY[name].lr)
    native, foreach = twin_runs(name, tmp_path, train, impl)
    assert_same_run(native, foreach, name, tmp_path, train, impl)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_lr_find_restores_model_and_optimizer(name, tmp_path):
    learn = learner(name, 'foreach', tmp_path)
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, REGISTRY[name].lr)
        before_model = {k: v.clone() for k, v in learn.model.state_dict().items()}
        before_opt = copy.deepcopy(learn.opt.state_dict())  # the live state moves during lr_find
        learn.lr_find(num_it=10, show_plot=False)
    for k, v in learn.model.state_dict().items(): torch.testing.assert_close(v, before_model[k], rtol=0, atol=0)
    for label, x, y in compare_states(before_opt, learn.opt.state_dict()):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), label


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_save_load_resumes_exactly(name, impl, tmp_path):
    "Saved by one implementation, resumed by the other: the same as training straight through."
    lr, other = REGISTRY[name].lr, {'foreach': 'fused', 'fused': 'foreach'}[impl]
    straight = learner(name, impl, tmp_path / 'a', shuffle=False)
    with straight.no_logging(), straight.no_bar(): straight.fit(2, lr)
    first = learner(name, impl, tmp_path / 'b', shuffle=False)
    with first.no_logging(), first.no_bar(): first.fit(1, lr)
    first.save('half', with_opt=True)
    resumed = learner(name, other, tmp_path / 'b', shuffle=False, seed=1)  # another init, overwritten by load
    resumed.load('half', with_opt=True)
    with resumed.no_logging(), resumed.no_bar(): resumed.fit(1, lr)
    assert_same_model(straight, resumed)
    assert_same_opt_state(straight, resumed)


@pytest.mark.cuda
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', ['SGD', 'Adam', 'Lamb', 'ranger'])
def test_mixed_precision_on_cuda(name, impl, precision, tmp_path):
    """fastai's `to_fp16` and `to_bf16` on CUDA: autocast, and (float16) a gradient scaler that unscales the
    gradients through the optimizer's `param_groups` and skips the steps whose gradients overflowed. (On CPU
    fastai's MixedPrecision turns itself off.)"""
    def train(learn): getattr(learn, f"to_{precision}")().fit(1, REGISTRY[name].lr)
    # float16 activations keep 11 bits: an ulp of a float32 weight (torch's fused Adam kernel takes √v/√debias2
    # where fastai takes √(v/debias2)) can flip their rounding (measured on an H200: 2 of 144 weights of the
    # first conv 1.9% apart after an epoch), hence `assert_same_run`'s measure of fastai's own sensitivity.
    assert_same_run(*twin_runs(name, tmp_path, train, impl, device='cuda'), name, tmp_path, train, impl, device='cuda')


@pytest.mark.parametrize('name,options', [('Adam', {}), ('ranger', {}), ('SGD', {'mom': 0.9}), ('Larc', {'clip': False})])
def test_factories_drop_into_learner(name, options, tmp_path):
    "`opt_func=fastforeach.Adam` as a fastai user writes it; `foreach=False` is fastai's own, same result."
    factory = getattr(fastforeach, name)
    runs = []
    for foreach in (True, False):
        learn = digits_learner(partial(factory, foreach=foreach, **options), path=tmp_path)
        with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(2, 1e-2)
        runs.append(learn)
    assert isinstance(runs[0].opt, (fastforeach.ForEachOptimizer, fastforeach.Lookahead))
    assert not isinstance(runs[1].opt, (fastforeach.ForEachOptimizer, fastforeach.Lookahead))
    assert_same_model(*runs)


def test_different_optimizers_are_told_apart(tmp_path):
    "The tolerance above is tight enough to see a real difference, e.g. another momentum."
    native = learner('Adam', 'native', tmp_path / 'n')
    other = digits_learner(partial(fastforeach.Adam, mom=0.89), path=tmp_path / 'o')
    for learn in (native, other):
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    with pytest.raises(AssertionError): assert_same_model(native, other)


def test_stable_adams_run_is_held_to_fastais_own_sensitivity(tmp_path):
    "The fallback measures: a one-ulp nudge moves StableAdam's fastai run far more than Adam's, less than a real change."
    def train(learn): learn.fit(2, 1e-3)
    stable = distance(*twin_runs('StableAdam', tmp_path / 's', train, 'native', nudge=True))
    adam = distance(*twin_runs('Adam', tmp_path / 'a', train, 'native', nudge=True))
    assert adam < TOL['rtol'] < stable
    other_eps = twin_runs('StableAdam', tmp_path / 'e', train, 'native')[0], \
        digits_learner(partial(fastforeach.StableAdam, eps=1e-5), path=tmp_path / 'e2')
    with other_eps[1].no_logging(), other_eps[1].no_bar(): train(other_eps[1])
    assert distance(*other_eps) > 2 * stable
