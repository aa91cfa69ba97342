"""The torch.optim face (`fastforeach.optim`) against torch.optim's own optimizers, and with what torch users
plug optimizers into: LR schedulers, GradScaler, checkpoints, named params."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import fastforeach.optim as fastforeach_optim
from fastforeach.optim import (FASTAI_EQUIVALENTS, REFERENCE_EQUIVALENTS, TORCH_EQUIVALENTS, SGD, Adam, AdamW,
                               TorchForEachOptimizer, bias_and_norm)
from fastforeach.testing.oracle import oracle_layers

CASES = [pytest.param(name, cfg, id=f"{name}-{cfg}") for name, (_, _, configs) in TORCH_EQUIVALENTS.items()
         for cfg in configs]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


class Pair:
    """The face's optimizer and torch's on identical copies of the oracle's two param groups (the second at a
    tenth of the lr), given identical fresh gradients, a new lr every step, and a param that never gets one."""
    def __init__(self, build_ours, build_torch, dtype=torch.float64, seed=0, device='cpu'):
        groups = oracle_layers(dtype, device)
        self.ours = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
        self.theirs = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
        self.opt = build_ours([{'params': g} for g in self.ours])
        self.ref = build_torch([{'params': g} for g in self.theirs])
        self.gen, self.t = torch.Generator().manual_seed(seed), 0
        self.no_grad = (len(groups) - 1, len(groups[-1]) - 1)

    def pairs(self):
        for gi, (ga, gb) in enumerate(zip(self.ours, self.theirs)):
            for pi, (pa, pb) in enumerate(zip(ga, gb)): yield (gi, pi), pa, pb

    def grads(self):
        for where, pa, pb in self.pairs():
            if where == self.no_grad: continue
            g = torch.randn(pa.shape, generator=self.gen, dtype=torch.float64) * 0.1
            pa.grad, pb.grad = g.to(pa, copy=True), g.to(pb, copy=True)

    def step(self, base_lr, vary_lr=True):
        self.grads()
        self.t += 1
        if vary_lr:
            lr = base_lr * (1 + 0.5 * math.sin(self.t / 7))
            for opt in (self.opt, self.ref):
                for i, group in enumerate(opt.param_groups): group['lr'] = lr / 10 ** (len(opt.param_groups) - 1 - i)
        self.opt.step(); self.ref.step()

    def assert_equal(self, dtype=torch.float64, when=''):
        tol = TOLERANCE[dtype]
        for where, pa, pb in self.pairs():
            assert torch.allclose(pa, pb, rtol=tol, atol=tol), (where, when, (pa - pb).abs().max().item())
        def held(sd): return {i: s for i, s in sd['state'].items() if any(v is not None for v in s.values())}
        ours, theirs = held(self.opt.state_dict()), held(self.ref.state_dict())
        assert ours.keys() == theirs.keys(), when
        for i, s in ours.items():
            for key, value in s.items():
                ref = theirs[i][key]
                if key == 'step': assert float(value) == float(ref), (i, key, when)
                else: assert torch.allclose(value, ref, rtol=tol, atol=tol), (i, key, when)


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('name,cfg', CASES)
def test_equals_torch(name, cfg, dtype, fused):
    """100 steps beside torch.optim's own optimizer (its per-tensor loop): every param and state tensor, in
    torch's key names, within 1e-10 in float64 (1e-5 in float32: torch's loop and the face's lists round
    in different orders)."""
    ours, theirs, configs = TORCH_EQUIVALENTS[name]
    options = configs[cfg]
    pair = Pair(lambda g: ours(g, lr=1e-2, fused=fused, **options),
                lambda g: theirs(g, lr=1e-2, foreach=False, **options), dtype)
    for t in range(1, 101):
        pair.step(1e-2)
        if t in (1, 2, 50, 100): pair.assert_equal(dtype, t)
    gi, pi = pair.no_grad
    assert torch.equal(pair.ours[gi][pi], oracle_layers(dtype)[gi][pi])
    # As torch's, the step leaves the gradients as they were (L2 goes into copies).
    for where, pa, pb in pair.pairs():
        if where != pair.no_grad: assert torch.equal(pa.grad, pb.grad.to(pa.dtype)), where


@pytest.mark.cuda
@pytest.mark.parametrize('name,cfg', CASES)
def test_equals_torch_on_cuda(name, cfg):
    """On CUDA, with `fused` and `foreach` left None (the face's fused step there), 30 steps beside
    torch.optim's own in float32."""
    ours, theirs, configs = TORCH_EQUIVALENTS[name]
    pair = Pair(lambda g: ours(g, lr=1e-2, **configs[cfg]), lambda g: theirs(g, lr=1e-2, foreach=False, **configs[cfg]),
                torch.float32, device='cuda')
    assert pair.opt.fused
    for t in range(1, 31): pair.step(1e-2)
    pair.assert_equal(torch.float32, 30)


def test_is_a_torch_optimizer_with_torch_defaults():
    "A real `torch.optim.Optimizer`, whose groups carry torch's hyper names and defaults."
    params = [nn.Parameter(torch.randn(3))]
    for ours, theirs, _ in TORCH_EQUIVALENTS.values():
        opt, ref = ours(params), theirs([nn.Parameter(torch.randn(3))])
        assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, TorchForEachOptimizer)
        for key in ref.defaults:
            assert opt.defaults[key] == ref.defaults[key], (ours.__name__, key)


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
def test_no_wd_inside_one_group_equals_two_torch_groups(fused):
    """`no_wd=bias_and_norm` over `named_parameters()` (one group) equals torch's AdamW given the same params
    in two groups, the biases and norm weights at weight decay 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, no_wd=bias_and_norm, fused=fused)
    decay = [p for p in twin.parameters() if p.ndim > 1]
    ref = torch.optim.AdamW([{'params': decay}, {'params': [p for p in twin.parameters() if p.ndim <= 1],
                                                 'weight_decay': 0.}], lr=1e-2, weight_decay=0.1, foreach=False)
    names = [n for n, p in model.named_parameters() if p.ndim <= 1]
    assert opt.param_groups[0]['param_names'] == [n for n, _ in model.named_parameters()] and names
    for _ in range(20):
        x = torch.randn(4, 6, dtype=torch.float64)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()): torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    assert 'do_wd' not in str(opt.state_dict())


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('name', ['AdamW', 'SGD'])
@pytest.mark.parametrize('direction', ['torch_to_face', 'face_to_torch'])
def test_checkpoints_move_to_and_from_torch(direction, name, fused):
    """Seven steps on one side, its state dict through `torch.save` into a fresh optimizer of the other, then
    thirteen more beside an uninterrupted optimizer of the loading side's kind: equal."""
    ours, theirs, configs = TORCH_EQUIVALENTS[name]
    options = configs['dampening' if name == 'SGD' else 'wd']
    face = lambda g: ours(g, lr=1e-2, fused=fused, **options)
    torch_opt = lambda g: theirs(g, lr=1e-2, foreach=False, **options)
    saver, loader = (torch_opt, face) if direction == 'torch_to_face' else (face, torch_opt)
    pair = Pair(saver, loader)  # `opt` saves; `ref` is the uninterrupted loader
    for _ in range(7): pair.step(1e-2)
    for _, pa, pb in pair.pairs(): pb.data.copy_(pa.data)
    buffer = io.BytesIO()
    torch.save(pair.opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = loader([{'params': g} for g in pair.ours])
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    # The resumed side continues on the saver's params; the uninterrupted loader is what it must equal.
    pair.ref.load_state_dict(copy.deepcopy(fresh.state_dict()))
    pair.opt = fresh
    for _ in range(13): pair.step(1e-2)
    pair.assert_equal(torch.float64, 'a checkpoint and 13')


def _state_snapshot(opt):
    return copy.deepcopy({id(p): {k: v for k, v in s.items()} for p, s in opt.state.items()})


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for key in a[k]:
            va, vb = a[k][key], b[k][key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


@pytest.mark.parametrize('break_it,message', [
    (lambda sd: sd.pop('param_groups'), "expected a dict with 'state' and 'param_groups'"),
    (lambda sd: sd['param_groups'].pop(), "1 param groups, the optimizer has 2"),
    (lambda sd: sd['param_groups'][1]['params'].pop(), "param group 1 has"),
    (lambda sd: sd['param_groups'][0].update(amsgrad=True), "Invalid amsgrad in the state dict's param group 0: True"),
    (lambda sd: sd['param_groups'][1].update(betas=(1.5, 0.9)), "Invalid betas in the state dict's param group 1"),
    (lambda sd: sd['state'][3].pop('exp_avg_sq'), "param group 0, param 3 (shape (16,)): missing state 'exp_avg_sq'"),
    (lambda sd: sd['state'][2].update(exp_avg=torch.zeros(5)), "param group 0, param 2 (shape (16,)): state 'exp_avg'"),
    (lambda sd: sd['state'][0].update(step=torch.tensor(-1.)), "state 'step' is -1"),
    (lambda sd: sd['state'].update({99: {}}), "state for param 99"),
])
def test_bad_state_dicts_are_refused_and_change_nothing(break_it, message):
    pair = Pair(lambda g: AdamW(g, lr=1e-2), lambda g: AdamW(g, lr=1e-2))
    for _ in range(3): pair.step(1e-2)
    sd = copy.deepcopy(pair.opt.state_dict())
    break_it(sd)
    before, groups = _state_snapshot(pair.opt), copy.deepcopy([{k: v for k, v in g.items() if k != 'params'}
                                                               for g in pair.opt.param_groups])
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        pair.opt.load_state_dict(sd)
    _assert_same_state(before, _state_snapshot(pair.opt))
    assert groups == [{k: v for k, v in g.items() if k != 'params'} for g in pair.opt.param_groups]


@pytest.mark.parametrize('build,message', [
    (lambda ps: AdamW(ps, lr=-1.), "Invalid lr for param group 0: -1.0"),
    (lambda ps: AdamW(ps, lr=torch.tensor([1e-3, 1e-2])), "Invalid lr for param group 0: a Tensor of 2 elements"),
    (lambda ps: AdamW(ps, lr=torch.tensor(-1e-3)), "Invalid lr for param group 0: -0.001"),
    (lambda ps: Adam(ps, betas=(0.9, 1.0)), r"Invalid betas for param group 0: 1.0"),
    (lambda ps: Adam(ps, eps=-1e-8), "Invalid eps for param group 0: -1e-08"),
    (lambda ps: AdamW(ps, weight_decay=float('nan')), "Invalid weight_decay for param group 0: nan"),
    (lambda ps: AdamW(ps, amsgrad=True), "Invalid amsgrad for param group 0: True"),
    (lambda ps: Adam(ps, maximize=True), "Invalid maximize for param group 0: True"),
    (lambda ps: Adam(ps, capturable=True), "Invalid capturable for param group 0: True"),
    (lambda ps: SGD(ps, differentiable=True), "Invalid differentiable for param group 0: True"),
    (lambda ps: SGD(ps, momentum=-0.1), "Invalid momentum for param group 0: -0.1"),
    (lambda ps: SGD(ps, nesterov=True), "Invalid nesterov for param group 0: True with momentum 0.0"),
    (lambda ps: SGD(ps, momentum=0.9, dampening=0.1, nesterov=True), "Invalid nesterov for param group 0: True with momentum 0.9"),
    (lambda ps: SGD(ps, foreach=False), "Invalid foreach: False"),
    (lambda ps: SGD(ps, foreach=True, fused=True), "Invalid foreach and fused: both True"),
    (lambda ps: fastforeach_optim.Adan(ps, betas=(0.9, 0.9)), r"Invalid betas for param group 0: \(0.9, 0.9\) \(must be 3"),
    (lambda ps: fastforeach_optim.QHAdam(ps, nus=(0.7, 1.5)), "Invalid nus for param group 0: 1.5"),
    (lambda ps: fastforeach_optim.Lion(ps, decoupled_weight_decay=1), "Invalid decoupled_weight_decay: 1"),
    (lambda ps: fastforeach_optim.RMSprop([{'params': ps[:1]}, {'params': ps[1:], 'centered': True}]),
     "Invalid centered: True for some param groups"),
    (lambda ps: fastforeach_optim.RMSprop(ps, alpha=1.5), "Invalid alpha for param group 0: 1.5"),
    (lambda ps: fastforeach_optim.RMSprop(ps, capturable=True), "Invalid capturable for param group 0: True"),
    (lambda ps: Adam([{'params': ps[:1]}, {'params': ps[1:], 'decoupled_weight_decay': True}]),
     "Invalid decoupled_weight_decay for param group 1: True"),
])
def test_bad_hypers_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))])


def test_bad_hypers_later_change_nothing():
    "A group added with a bad hyper is not added; a bad lr set later is refused at the step, before any param moves."
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    opt = AdamW(params[:1], lr=1e-2)
    with pytest.raises(ValueError, match="Invalid betas for param group 1"):
        opt.add_param_group({'params': params[1:], 'betas': (0.9, 2.0)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({'params': params[1:], 'lr': 1e-3})
    for p in params: p.grad = torch.ones_like(p)
    opt.param_groups[1]['lr'] = -1.
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="Invalid lr for param group 1: -1.0"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state


def test_sgd_takes_momentum_from_a_group_added_later():
    "A group with momentum added to an SGD built without: from then on, torch's momentum for that group."
    pair = Pair(lambda g: SGD(g[:1], lr=1e-2), lambda g: torch.optim.SGD(g[:1], lr=1e-2))
    for opt, params in ((pair.opt, pair.ours), (pair.ref, pair.theirs)):
        opt.add_param_group({'params': params[1], 'momentum': 0.9, 'dampening': 0.2})
    for t in range(10): pair.step(1e-2)
    pair.assert_equal()


SCHEDULERS = {
    'StepLR': lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    'OneCycleLR': lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[1e-2, 1e-3], total_steps=30),
    'CosineAnnealingWarmRestarts': lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=7),
    'LambdaLR': lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    'ReduceLROnPlateau': lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    'SequentialLR': lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[5]),
}


@pytest.mark.parametrize('name', SCHEDULERS)
def test_lr_schedulers_drive_it_as_they_drive_torch(name):
    "Each scheduler gives the face the lrs it gives torch's AdamW, and the params follow: equal over 30 steps."
    pair = Pair(lambda g: AdamW(g, lr=1e-2, weight_decay=0.1), lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1))
    scheds = [SCHEDULERS[name](pair.opt), SCHEDULERS[name](pair.ref)]
    for t in range(30):
        pair.step(1e-2, vary_lr=False)
        for sched in scheds:
            if name == 'ReduceLROnPlateau': sched.step(1.0)  # a loss that never improves
            else: sched.step()
        assert [g['lr'] for g in pair.opt.param_groups] == [g['lr'] for g in pair.ref.param_groups], t
    pair.assert_equal()


def test_grad_scaler_skips_a_step_with_an_inf_gradient():
    """`GradScaler.step` skips a step whose gradients hold an inf: params and state untouched (as torch's AdamW
    under the same scaler); the next finite step goes on equal to torch."""
    pair = Pair(lambda g: AdamW(g, lr=1e-2), lambda g: torch.optim.AdamW(g, lr=1e-2), torch.float32)
    scalers = [torch.amp.GradScaler('cpu', init_scale=4.), torch.amp.GradScaler('cpu', init_scale=4.)]
    for scaler in scalers: scaler.scale(torch.ones(()))  # as a scaled loss would: the scale is made
    for t in range(6):
        pair.grads()
        for _, pa, pb in pair.pairs():  # gradients of the scaled loss
            if pa.grad is not None: pa.grad *= scalers[0].get_scale(); pb.grad *= scalers[1].get_scale()
        if t == 3:
            for _, pa, pb in pair.pairs():
                if pa.grad is not None: pa.grad[0] = pb.grad[0] = float('inf'); break
            before = [p.detach().clone() for _, p, _ in pair.pairs()], _state_snapshot(pair.opt)
        for scaler, opt in zip(scalers, (pair.opt, pair.ref)):
            scaler.step(opt)
            scaler.update()
        if t == 3:
            assert all(torch.equal(a, p) for a, (_, p, _) in zip(before[0], pair.pairs()))
            _assert_same_state(before[1], _state_snapshot(pair.opt))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.
    pair.assert_equal(torch.float32)


def test_closure_and_zero_grad():
    "`step(closure)` evaluates the closure with gradients on and returns its loss; `zero_grad` both ways, packs too."
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    for fused in (False, True):
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
        x = torch.randn(8, 4)
        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss
        losses = [opt.step(closure).item() for _ in range(5)]
        assert losses[-1] < losses[0]
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())


FASTAI_CASES = [pytest.param(name, cfg, id=f"{name}-{cfg}") for name, (_, configs) in FASTAI_EQUIVALENTS.items()
                for cfg in configs]


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('name,cfg', FASTAI_CASES)
def test_equals_the_fastai_face(name, cfg, fused):
    """Given torch's keywords, the torch face's optimizer steps as the fastai face's of the same rule given the
    hypers they name (fastai's vocabulary, including the defaults): 30 steps in float64, to 1e-10, two
    groups, a new lr every step; every param and the state each keeps."""
    import inspect
    from fastforeach.registry import REGISTRY
    registry_name, configs = FASTAI_EQUIVALENTS[name]
    cls, spec = getattr(fastforeach_optim, name), REGISTRY[registry_name]
    groups = oracle_layers(torch.float64)
    ours = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    theirs = [[nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    opt = cls([{'params': g} for g in ours], lr=1e-3, fused=fused, **configs[cfg])
    hypers = {k: v for k, v in opt.hypers(opt.param_groups[0]).items() if k != 'lr'}
    accepted = inspect.signature(spec.foreach).parameters
    if 'clip' in accepted: hypers['clip'] = opt.clip
    ref = spec.make('fused' if fused else 'foreach', theirs, lr=1e-3, decouple_wd=opt.decouple_wd,
                    **{k: v for k, v in hypers.items() if k in accepted})
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 31):
        for ga, gb in zip(ours, theirs):
            for pa, pb in zip(ga, gb):
                g = torch.randn(pa.shape, generator=gen, dtype=torch.float64) * 0.1
                pa.grad, pb.grad = g.clone(), g.clone()
        lrs = [1e-3 * (1 + 0.5 * math.sin(t / 7)) / 10 ** (1 - i) for i in range(2)]
        for group, lr in zip(opt.param_groups, lrs): group['lr'] = lr
        ref.set_hyper('lr', lrs)
        opt.step(); ref.step()
    for ga, gb in zip(ours, theirs):
        for pa, pb in zip(ga, gb):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)
            for key in opt.core.route_of(pa, opt.state[pa]).rule.state_keys:
                torch.testing.assert_close(opt.state[pa][key], ref.state[pb][key], rtol=1e-10, atol=1e-10)


REFERENCE_CASES = [pytest.param(name, cfg, id=f"{name}-{cfg}") for name, (_, _, configs) in REFERENCE_EQUIVALENTS.items()
                   for cfg in configs]


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('name,cfg', REFERENCE_CASES)
def test_equals_the_published_implementation(name, cfg, fused):
    """Given the same keywords as the published optimizer of the same math (torch-optimi's, schedulefree's),
    the same params over 100 steps (float64)."""
    package, ref_name, configs = REFERENCE_EQUIVALENTS[name]
    module = pytest.importorskip(package)
    options = configs[cfg]
    def reference(groups):
        opt = getattr(module, ref_name)(groups, lr=1e-3, foreach=False, **options)
        if hasattr(opt, 'train'): opt.train()
        return opt
    pair = Pair(lambda g: getattr(fastforeach_optim, name)(g, lr=1e-3, fused=fused, **options), reference)
    for t in range(100): pair.step(1e-3)
    for where, pa, pb in pair.pairs(): torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)


def _train_pair(steps, build, step_fn=None):
    "Two copies of a small model, one stepped by `build`'s optimizer through `step_fn` (eager by default), one eagerly."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    opts = build(model), build(twin)
    def train(m, opt, x):
        loss = m(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    run = step_fn(train) if step_fn else train
    for _ in range(steps):
        x = torch.randn(5, 6)
        run(model, opts[0], x); train(twin, opts[1], x)
    return model, twin, opts


def test_dcp_state_dict_functions_take_it():
    """torch.distributed.checkpoint's `get_optimizer_state_dict` / `set_optimizer_state_dict` take the face's
    optimizers directly: saved by param name with torch's keys, loaded into a fresh one that goes on equal."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    model, twin, (opt, ref) = _train_pair(3, lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved['state']['0.weight']) == {'step', 'exp_avg', 'exp_avg_sq'}
    fresh = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    set_optimizer_state_dict(model, fresh, saved)
    for _ in range(3):
        x = torch.randn(5, 6)
        for m, o in ((model, fresh), (twin, ref)):
            m(x).pow(2).mean().backward(); o.step(); o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_compiled_training_step_calls_it():
    """`torch.compile` of a training step that calls `opt.step()`: dynamo breaks the graph at the step (a Python
    loop over the param groups) and runs it eagerly; the result equals the eager loop's."""
    model, twin, _ = _train_pair(3, lambda m: SGD(m.parameters(), lr=0.1, momentum=0.9), torch.compile)
    for p, q in zip(model.parameters(), twin.parameters()): torch.testing.assert_close(p, q)


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
def test_gradient_release_in_a_plain_loop(fused):
    """Backward inside `GradientRelease(opt)` steps the params bucket by bucket and frees every gradient: the
    params and state equal `opt.step()`'s, and at most a bucket and a layer of gradients are alive at once."""
    from fastforeach.memory import PeakGradBytes
    from fastforeach.optim import GradientRelease
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)]).double()
    twin = copy.deepcopy(model)
    layer = sum(p.nbytes for p in model[0].parameters())
    build = lambda m: AdamW(m.named_parameters(), lr=1e-2, weight_decay=0.1, no_wd=bias_and_norm, fused=fused)
    opt, ref = build(model), build(twin)
    tracker = PeakGradBytes(model.parameters())
    release = GradientRelease(opt, bucket_bytes=2 * layer)
    for _ in range(4):
        x = torch.randn(4, 32, dtype=torch.float64)
        with release: model(x).pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters())
        twin(x).pow(2).mean().backward(); ref.step(); ref.zero_grad()
    release.remove()
    assert tracker.peak <= 3 * layer
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]['grad_avg'], ref.state[q]['grad_avg'], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs a fastforeach.optim optimizer, not AdamW"):
        GradientRelease(torch.optim.AdamW(twin.parameters()))


def test_schedule_free_train_and_eval_modes():
    """`eval()` puts the averaged weights x in the params and `train()` takes them back to y, as schedulefree's
    AdamWScheduleFree does; a step in eval mode is refused, changing nothing; the mode is saved with the state."""
    schedulefree = pytest.importorskip('schedulefree')
    def reference(groups):
        opt = schedulefree.AdamWScheduleFree(groups, lr=1e-3, foreach=False, weight_decay=0.01)
        opt.train()
        return opt
    pair = Pair(lambda g: fastforeach_optim.ScheduleFreeAdamW(g, lr=1e-3, weight_decay=0.01), reference)
    for _ in range(5): pair.step(1e-3)
    for mode in ('eval', 'train', 'eval'):
        getattr(pair.opt, mode)(); getattr(pair.ref, mode)()
        for _, pa, pb in pair.pairs(): torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)
    assert [g['train_mode'] for g in pair.opt.state_dict()['param_groups']] == [False, False]
    before = [p.detach().clone() for _, p, _ in pair.pairs()]
    pair.grads()
    with pytest.raises(ValueError, match="ScheduleFreeAdamW is in eval mode"):
        pair.opt.step()
    assert all(torch.equal(a, p) for a, (_, p, _) in zip(before, pair.pairs()))
    pair.opt.train(); pair.ref.train()
    pair.step(1e-3)
    for _, pa, pb in pair.pairs(): torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name,cfg', [(name, cfg) for name, (_, configs) in FASTAI_EQUIVALENTS.items()
                                      for cfg in list(configs)[:1]])
@pytest.mark.parametrize('direction', ['fastai_to_torch', 'torch_to_fastai'])
def test_checkpoints_move_between_the_faces(direction, name, cfg):
    """Seven steps on one face, its state into a fresh optimizer of the other face (the fastai face's format:
    `fastai_state_dict()` one way, `load_state_dict` of it the other), then thirteen more beside an
    uninterrupted optimizer of the loading face: equal in float64."""
    import inspect
    from fastforeach.registry import REGISTRY
    registry_name, configs = FASTAI_EQUIVALENTS[name]
    cls, spec = getattr(fastforeach_optim, name), REGISTRY[registry_name]
    probe = cls([nn.Parameter(torch.zeros(1))], lr=1e-3, **configs[cfg])
    hypers = {k: v for k, v in probe.hypers(probe.param_groups[0]).items() if k != 'lr'}
    accepted = inspect.signature(spec.foreach).parameters
    if 'clip' in accepted: hypers['clip'] = probe.clip
    fastai_options = {'decouple_wd': probe.decouple_wd, **{k: v for k, v in hypers.items() if k in accepted}}
    torch_face = lambda groups: cls([{'params': g} for g in groups], lr=1e-3, **configs[cfg])
    fastai_face = lambda groups: spec.make('foreach', groups, lr=1e-3, **fastai_options)
    saver, loader = (fastai_face, torch_face) if direction == 'fastai_to_torch' else (torch_face, fastai_face)
    groups = oracle_layers(torch.float64)
    copies = [[[nn.Parameter(p.detach().clone()) for p in g] for g in groups] for _ in range(3)]
    saving, resumed, straight = saver(copies[0]), None, loader(copies[2])
    gen = torch.Generator().manual_seed(0)
    def step(opts, sets, t):
        g = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in grp] for grp in groups]
        for opt, params in zip(opts, sets):
            for grads, ps in zip(g, params):
                for gr, p in zip(grads, ps): p.grad = gr.clone()
            opt.step()
    for t in range(7): step([saving, straight], [copies[0], copies[2]], t)
    for a, b in zip(copies[0], copies[1]):
        for p, q in zip(a, b): q.data.copy_(p.data)
    sd = saving.fastai_state_dict() if direction == 'torch_to_fastai' else saving.state_dict()
    resumed = loader(copies[1])
    resumed.load_state_dict(copy.deepcopy(sd))
    straight.load_state_dict(copy.deepcopy(resumed.state_dict()))
    for a, b in zip(copies[1], copies[2]):
        for p, q in zip(a, b): q.data.copy_(p.data)
    for t in range(13): step([resumed, straight], [copies[1], copies[2]], t)
    for a, b in zip(copies[1], copies[2]):
        for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
def test_lookahead_equals_the_fastai_face_and_resumes(fused):
    """`Lookahead(SGD(...), k=3)` steps as the fastai face's Lookahead over its SGD (float64, 1e-10, a new lr
    every step), and its state dict (the inner's, slow weights and counts included) resumes exactly."""
    import fastforeach
    from fastforeach.optim import Lookahead
    groups = oracle_layers(torch.float64)
    sets = [[[nn.Parameter(p.detach().clone()) for p in g] for g in groups] for _ in range(3)]
    face = lambda params: Lookahead(SGD([{'params': g} for g in params], lr=1e-2, momentum=0.9, weight_decay=0.01,
                                        fused=fused), k=3, alpha=0.4)
    ours, resumed = face(sets[0]), None
    theirs = fastforeach.Lookahead(fastforeach.SGD(sets[1], 1e-2, mom=0.9, wd=0.01, decouple_wd=False, fused=fused),
                                   k=3, alpha=0.4, fused=fused)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 21):
        g = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in grp] for grp in groups]
        lrs = [1e-2 * (1 + 0.5 * math.sin(t / 7)) / 10 ** (1 - i) for i in range(2)]
        opts = [(ours, sets[0]), (theirs, sets[1])] + ([(resumed, sets[2])] if resumed else [])
        for opt, params in opts:
            for grads, ps in zip(g, params):
                for gr, p in zip(grads, ps): p.grad = gr.clone()
            if opt is theirs: opt.set_hyper('lr', lrs)
            else:
                for group, lr in zip(opt.param_groups, lrs): group['lr'] = lr
            opt.step()
        if t == 7:  # mid-cycle: a checkpoint of the first resumed by a fresh one from its params
            for a, b in zip(sets[0], sets[2]):
                for p, q in zip(a, b): q.data.copy_(p.data)
            resumed = face(sets[2])
            resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
    for params in (sets[1], sets[2]):
        for a, b in zip(sets[0], params):
            for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    assert ours.param_groups[0]['lookahead_count'] == 20 and 'slow_weight' in ours.state_dict()['state'][0]


def test_lookahead_refuses_bad_input_changing_nothing():
    from fastforeach.optim import Lookahead
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="Invalid k: 0"): Lookahead(SGD(params), k=0)
    with pytest.raises(ValueError, match="Invalid optimizer: SGD"): Lookahead(torch.optim.SGD(params))
    opt = Lookahead(SGD(params, lr=0.1), k=2)
    params[0].grad = torch.ones(3)
    opt.param_groups[0]['lookahead_alpha'] = 2.
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="Invalid lookahead_alpha for param group 0: 2.0"): opt.step()
    assert torch.equal(params[0], before) and not opt.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # schedulers take it, and set the inner's lrs
    opt.param_groups[0]['lookahead_alpha'] = 0.5
    opt.step(); sched.step()
    assert opt.optimizer.param_groups[0]['lr'] == 0.05


@pytest.fixture
def torch_muon_in_float64(monkeypatch):
    "torch.optim.Muon with its Newton-Schulz iteration in float64 (its cast to bf16 made a float64 copy): exact."
    import torch.optim._muon as torch_muon
    iterate = torch_muon._zeropower_via_newtonschulz
    def in_float64(grad, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, 'bfloat16', lambda t: t.to(torch.float64, copy=True))
            return iterate(grad, *args, **kwargs)
    monkeypatch.setattr(torch_muon, '_zeropower_via_newtonschulz', in_float64)


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
@pytest.mark.parametrize('options', [{}, {'nesterov': False, 'momentum': 0.9, 'ns_steps': 3, 'weight_decay': 0.01},
                                     {'adjust_lr_fn': 'match_rms_adamw'}], ids=['default', 'plain', 'match_rms'])
@pytest.mark.parametrize('method', ['standard', 'gram'])
def test_muon_equals_torch(options, method, fused, torch_muon_in_float64):
    """100 steps beside torch.optim.Muon, both iterating in float64 (the Gram iteration is the same polynomial):
    two groups of matrices (two of one shape, batched), a new lr every step, one without a gradient."""
    torch.manual_seed(0)
    shapes = [[(24, 10), (10, 24), (24, 10)], [(5, 24), (16, 16), (3, 4)]]
    groups = [[torch.randn(s, dtype=torch.float64) * 0.1 for s in g] for g in shapes]
    ours = [[nn.Parameter(t.clone()) for t in g] for g in groups]
    theirs = [[nn.Parameter(t.clone()) for t in g] for g in groups]
    opt = fastforeach_optim.Muon([{'params': g} for g in ours], lr=1e-2, ns_dtype=torch.float64, ns_method=method,
                                 fused=fused, **options)
    ref = torch.optim.Muon([{'params': g} for g in theirs], lr=1e-2, **options)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 101):
        for gi, (ga, gb) in enumerate(zip(ours, theirs)):
            for pi, (pa, pb) in enumerate(zip(ga, gb)):
                if (gi, pi) == (1, 2): continue
                g = torch.randn(pa.shape, generator=gen, dtype=torch.float64)
                pa.grad, pb.grad = g.clone(), g.clone()
        for o in (opt, ref):
            for i, group in enumerate(o.param_groups): group['lr'] = 1e-2 * (1 + 0.5 * math.sin(t / 7)) / 10 ** (1 - i)
        opt.step(); ref.step()
    for ga, gb in zip(ours, theirs):
        for pa, pb in zip(ga, gb): torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)
    ours_sd, theirs_sd = opt.state_dict()['state'], ref.state_dict()['state']
    assert ours_sd.keys() == theirs_sd.keys()
    for i in ours_sd:
        torch.testing.assert_close(ours_sd[i]['momentum_buffer'], theirs_sd[i]['momentum_buffer'], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('build,message', [
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3))]), r"Invalid params for param group 0: a param of shape \(3,\)"),
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3, 3))], ns_coefficients=(3., -4., 2.)), "Invalid ns_coefficients"),
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3, 3))], eps=1e-5), "Invalid eps for param group 0: 1e-05"),
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3, 3))], adjust_lr_fn='spectral_unclamped'),
     "Invalid adjust_lr_fn for param group 0: 'spectral_unclamped'"),
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3, 3))], ns_method='svd'), "Invalid ns_method for param group 0"),
    (lambda: fastforeach_optim.Muon([nn.Parameter(torch.randn(3, 3))], ns_steps=0), "Invalid ns_steps for param group 0: 0"),
])
def test_muon_refuses_what_it_does_not_do(build, message):
    with pytest.raises(ValueError, match=message): build()


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
def test_a_tensor_lr_steps_as_its_value(fused):
    "A one-element tensor lr (as compiled training loops keep it), scheduled in place, steps as the float lr does."
    # float64, as the float lr: a float32 tensor would round every lr to float32's precision
    pair = Pair(lambda g: AdamW(g, lr=torch.tensor(1e-2, dtype=torch.float64), fused=fused),
                lambda g: AdamW(g, lr=1e-2, fused=fused))
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9) for o in (pair.opt, pair.ref)]
    for _ in range(10):
        pair.step(1e-2, vary_lr=False)
        for sched in scheds: sched.step()
    assert isinstance(pair.opt.param_groups[0]['lr'], torch.Tensor)
    pair.assert_equal(torch.float64)
