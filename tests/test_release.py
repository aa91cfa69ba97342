"""Gradient release (`GradientRelease`): buckets stepped during backward give the params and state of a
normal step, and the gradients alive at once shrink to a bucket and a layer."""
import re

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation, GradientClip
from torch import nn

import fastforeach
from fastforeach.core import inner_optimizer
from fastforeach.memory import PeakGradBytes
from fastforeach.registry import REGISTRY
from fastforeach.testing.training import cnn_splitter, digits_cnn, digits_learner


class Float64(Callback):
    "Batches in float64, as the model."
    order = -20
    def before_batch(self): self.learn.xb = tuple(x.double() for x in self.xb)


def model_with_unused_param() -> nn.Sequential:
    model = digits_cnn()
    model.register_parameter('unused', nn.Parameter(torch.ones(3)))  # never gets a gradient
    return model


def splitter(model): return [cnn_splitter(model)[0], cnn_splitter(model)[1] + [model.unused]]


def run(name, impl, release: bool, bucket_bytes=2000, device='cpu'):
    """`fit_one_cycle` in float64 with slice lrs, the body frozen (its norm layers train) for an epoch,
    then all of it; the optimizer as the registry builds it."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed

    from fastforeach.testing.training import digits_dls
    spec = REGISTRY[name]
    set_seed(0, reproducible=True)
    cbs = [Float64()] + ([fastforeach.GradientRelease(bucket_bytes)] if release else [])
    learn = Learner(digits_dls(n_train=256, device=device), model_with_unused_param().double().to(device),
                    loss_func=CrossEntropyLossFlat(),
                    opt_func=lambda params, lr: spec.make(impl, params, lr), splitter=splitter, cbs=cbs)
    with learn.no_logging(), learn.no_bar():
        learn.freeze()
        learn.fit_one_cycle(1, lr_max=slice(spec.lr / 10, spec.lr))
        learn.unfreeze()
        learn.fit_one_cycle(1, lr_max=slice(spec.lr / 10, spec.lr))
    return learn


# On CUDA, one optimizer of each kind of step (PyTorch's kernel, a compiled update, pack phases around norms,
# Muon's two routes, Lookahead's sync): every row would take minutes of a lent GPU's time.
ON_CUDA = ('Adam', 'RMSProp', 'Lamb', 'Larc', 'Muon', 'ranger')
RELEASE_CASES = [(name, impl, 'cpu') for name in REGISTRY for impl in ('foreach', 'fused')] + [
    pytest.param(name, impl, 'cuda', marks=pytest.mark.cuda) for name in ON_CUDA for impl in ('foreach', 'fused')]


@pytest.mark.parametrize('name,impl,device', RELEASE_CASES)
def test_release_steps_as_a_normal_step(name, impl, device):
    "Every optimizer, foreach and fused, Lookahead and ranger included: params and state equal to 1e-10."
    normal, released = run(name, impl, False, device=device), run(name, impl, True, device=device)
    for a, b in zip(normal.model.parameters(), released.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    sa, sb = normal.opt.state_dict(), released.opt.state_dict()
    for x, y in zip(sa['state'], sb['state']):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], torch.Tensor): torch.testing.assert_close(y[k], x[k], rtol=1e-10, atol=1e-12)
            else: assert x[k] == y[k], k
    assert sa.get('count') == sb.get('count')
    assert all(p.grad is None for p in released.model.parameters())


def releasing(model, bucket_bytes=25 << 20, opt_func=fastforeach.Adam):
    "A Learner's optimizer over `model` with `GradientRelease` ready for backward passes run by hand."
    cb = fastforeach.GradientRelease(bucket_bytes)
    learn = digits_learner(opt_func, cbs=[cb])
    learn.model, learn.opt = model, None
    learn.create_opt()
    learn.training = True
    return learn, cb


def test_peak_gradient_bytes_are_a_bucket_and_a_layer():
    "A 12-layer MLP: without release every gradient is alive at the end of backward; with it, a bucket and a layer's."
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    x = torch.randn(8, 64)
    layer = sum(p.nbytes for p in model[0].parameters())
    learn, cb = releasing(model, bucket_bytes=2 * layer)
    peaks = {}
    for release in (False, True):
        tracker = PeakGradBytes(model.parameters())  # before the release's hooks: it sees a bucket before it is freed
        if release: cb.before_fit()
        for _ in range(3):
            if release: cb.before_backward()
            model(x).pow(2).mean().backward()
            if release: cb.after_backward()
            else: learn.opt.step(); learn.opt.zero_grad(); [setattr(p, 'grad', None) for p in model.parameters()]
        tracker.remove()
        peaks[release] = tracker.peak
    cb.after_fit()
    assert peaks[False] == sum(p.nbytes for p in model.parameters())
    assert peaks[True] <= 2 * layer + layer


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
def test_adam_in_4_6_bytes_a_param_with_release(impl):
    """bf16 params, 24-bit masters, the first moment in 4 bits and the second in 8, gradients released: 4.6
    bytes a param at most held between steps (2 + 1 + 0.53 + 1.02), and during backward the gradients of a
    bucket and a layer at most besides."""
    from functools import partial

    from fastforeach.memory import memory_report
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)]).bfloat16()
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    layer = sum(p.nbytes for p in model[0].parameters())
    opt_func = partial(fastforeach.Adam, rounding='master24', fused=impl == 'fused',
                       state_format={'grad_avg': '4bit', 'sqr_avg': '8bit'})
    learn, cb = releasing(model, bucket_bytes=2 * layer, opt_func=opt_func)
    tracker = PeakGradBytes(model.parameters())
    cb.before_fit()
    for _ in range(3):
        cb.before_backward()
        model(x).float().pow(2).mean().backward()
        cb.after_backward()
    tracker.remove()
    cb.after_fit()
    params = list(model.parameters())
    report = memory_report(params, learn.opt)['per_param']
    assert report['grads'] == 0 and report['total'] <= 4.6, report
    assert all(learn.opt.state[p]['kahan_comp'].dtype == torch.int8 for p in params)
    assert tracker.peak <= 2 * layer + layer


@pytest.mark.parametrize('cb,message', [(GradientAccumulation(2), 'GradientAccumulation'),
                                        (GradientClip(), 'GradientClip')])
def test_what_release_cannot_do_is_refused_before_anything_changes(cb, message):
    learn = digits_learner(fastforeach.Adam, cbs=[cb, fastforeach.GradientRelease()])
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=message), learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_fastais_own_optimizer_is_refused():
    learn = digits_learner(lambda ps, lr: fastforeach.Adam(ps, lr, foreach=False), cbs=fastforeach.GradientRelease())
    with pytest.raises(ValueError, match='needs a fastforeach optimizer'), learn.no_logging(), learn.no_bar():
        learn.fit(1, 1e-3)


def test_removing_the_callback_restores_normal_steps(tmp_path):
    "Validation and lr_find run with release on; once it is removed, fastai's own step runs again."
    learn = digits_learner(fastforeach.Adam, cbs=fastforeach.GradientRelease(), path=tmp_path)
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, 1e-3)
        loss, _ = learn.validate()
        learn.lr_find(num_it=5, show_plot=False)
        learn.remove_cb(fastforeach.GradientRelease)
        before = [p.detach().clone() for p in learn.model.parameters()]
        learn.fit(1, 1e-3)
    assert not torch.isnan(torch.tensor(loss))
    assert not all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_a_shared_weight_is_stepped_once_after_its_last_gradient():
    "Tied weights: one param used twice in a forward is stepped once, with the sum of its gradients."
    torch.manual_seed(0)
    shared, twin = nn.Linear(8, 8), nn.Linear(8, 8)
    twin.load_state_dict(shared.state_dict())
    x = torch.randn(4, 8)
    learn, cb = releasing(nn.Sequential(shared, nn.ReLU(), shared), bucket_bytes=1)
    cb.before_fit()
    cb.before_backward()
    learn.model(x).pow(2).mean().backward()
    cb.after_backward()
    cb.after_fit()
    opt = fastforeach.Adam(list(twin.parameters()), 1e-2)
    nn.Sequential(twin, nn.ReLU(), twin)(x).pow(2).mean().backward()
    opt.set_hyper('lr', learn.opt.hypers[0]['lr'])
    opt.step()
    for a, b in zip(shared.parameters(), twin.parameters()): torch.testing.assert_close(a, b)
    assert learn.opt.state[shared.weight]['step'] == 1


# --- optimizer accumulation ------------------------------------------------------------------------

def accumulating_run(opt_func, cbs, epochs=1, lr=1e-2, bs=32, float64=True, n_train=256, one_cycle=True):
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed

    from fastforeach.testing.training import digits_dls
    set_seed(0, reproducible=True)
    model = digits_cnn().double() if float64 else digits_cnn()
    learn = Learner(digits_dls(n_train=n_train, bs=bs), model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func,
                    metrics=accuracy, cbs=([Float64()] if float64 else []) + cbs)
    with learn.no_logging(), learn.no_bar():
        if one_cycle: learn.fit_one_cycle(epochs, lr)
        else: learn.fit(epochs, lr)
    return learn


@pytest.mark.parametrize('release', [False, True])
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
def test_accumulated_momentum_is_gradient_accumulation(impl, release):
    """SGD's momentum is an average of the gradient: folding 4 micro-batches into it gives exactly what fastai's
    GradientAccumulation gives (float64), with or without gradient release. (With constant hypers: a
    schedule that moves mom between micro-batches makes the fold decay by the first one's mom, where
    GradientAccumulation's step uses the last one's.)"""
    from functools import partial
    opt_func = partial(fastforeach.SGD, mom=0.9, wd=1e-2, fused=impl == 'fused')
    ga = accumulating_run(opt_func, [GradientAccumulation(4 * 32)], one_cycle=False)
    oa = accumulating_run(opt_func, [fastforeach.OptimizerAccumulation(4)] +
                          ([fastforeach.GradientRelease()] if release else []), one_cycle=False)
    for a, b in zip(ga.model.parameters(), oa.model.parameters()): torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def accumulation_cases() -> tuple[list, list]:
    """From the rules' declarations (`rules.declare(accumulation=...)`), per registry row: its first config whose
    rules define optimizer accumulation, and its first whose rules refuse it, with the reason they give."""
    takes, refuses = {}, {}
    for name, spec in REGISTRY.items():
        for options in spec.configs.values():
            opt = inner_optimizer(spec.make('foreach', [nn.Parameter(torch.zeros(2, 2))], **options))
            reasons = [route.rule.no_accumulation for route in opt.core.routes if route.rule.accumulation is None]
            if reasons: refuses.setdefault(name, (name, options, reasons[0]))
            else: takes.setdefault(name, (name, options))
    return list(takes.values()), list(refuses.values())


ACCUMULATES, REFUSES = accumulation_cases()


def test_declarations_say_which_optimizers_accumulate():
    "The cases below, as the rules declare them (what the module docstring of `accumulation.py` says)."
    assert [n for n, _ in ACCUMULATES] == ['SGD', 'RMSProp', 'Adam', 'RAdam', 'Lamb', 'ranger', 'Lookahead']
    assert [n for n, _, _ in REFUSES] == ['SGD', 'RMSProp', 'QHAdam', 'Larc', 'Lookahead', 'Lion', 'Adan',
                                          'StableAdam', 'ScheduleFreeAdam', 'Muon', 'Adafactor']


@pytest.mark.parametrize('name,options', ACCUMULATES, ids=[n for n, _ in ACCUMULATES])
def test_one_micro_batch_is_a_normal_step(name, options):
    "n_acc=1 folds each batch in and moves at once: the same params as without it."
    spec = REGISTRY[name]
    opt_func = lambda params, lr: spec.make('foreach', params, lr, **options)
    normal = accumulating_run(opt_func, [], lr=spec.lr)
    one = accumulating_run(opt_func, [fastforeach.OptimizerAccumulation(1)], lr=spec.lr)
    for a, b in zip(normal.model.parameters(), one.model.parameters()): torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_second_moment_folds_the_mean_of_squares():
    "Adam after 2 micro-batches: m from their mean gradient (exact), v from the mean of their squares (the approximation)."
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = fastforeach.Adam([p], lr=1e-3, wd=0.)
    g1, g2 = torch.tensor([1., 2., 3.], dtype=torch.float64), torch.tensor([3., 0., -1.], dtype=torch.float64)
    for i, g in enumerate((g1, g2)):
        opt.accumulation = (i, 2)
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    torch.testing.assert_close(state['grad_avg'], 0.1 * (g1 + g2) / 2)
    torch.testing.assert_close(state['sqr_avg'], 0.01 * (g1 ** 2 + g2 ** 2) / 2)
    assert state['step'] == 1 and not torch.equal(p.detach(), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize('name,options,why', REFUSES, ids=[n for n, _, _ in REFUSES])
def test_optimizers_that_move_by_the_gradient_refuse(name, options, why):
    "Refused at the first step, with the reason the rule declares, before anything changes."
    learn = digits_learner(lambda ps, lr: REGISTRY[name].make('foreach', ps, lr, **options),
                           cbs=fastforeach.OptimizerAccumulation(4))
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=re.escape(why)), learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_accumulated_adam_trains_as_gradient_accumulation():
    """Digits, `fit_one_cycle(10)`, 4 micro-batches of 64: Adam with optimizer accumulation ends within a point of
    Adam with fastai's GradientAccumulation over the same effective batch (mean over 2 seeds, 512 images each)."""
    from fastforeach import bench
    ga, oa = bench.accumulation_table(('Adam',), seeds=(0, 1))['rows']
    assert (ga['setup'], oa['setup']) == ('GradientAccumulation', 'OptimizerAccumulation')
    assert abs(oa['accuracy'] - ga['accuracy']) <= 0.01, (ga, oa)
    assert oa['accuracy'] > 0.8


@pytest.mark.parametrize('name', ['Adam', 'Lamb', 'ranger'])
def test_accumulation_with_release_is_accumulation(name):
    "Folding each bucket's gradients during backward gives what folding them all after it gives."
    spec = REGISTRY[name]
    opt_func = lambda params, lr: spec.make('fused', params, lr)
    plain = accumulating_run(opt_func, [fastforeach.OptimizerAccumulation(3)], lr=spec.lr)
    released = accumulating_run(opt_func, [fastforeach.OptimizerAccumulation(3), fastforeach.GradientRelease(2000)],
                                lr=spec.lr)
    for a, b in zip(plain.model.parameters(), released.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
