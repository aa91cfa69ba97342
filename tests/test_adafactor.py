"""Adafactor beyond the registry's tables (which hold it to torch.optim.Adafactor and to its fastai-style
form): its factored state as users see it (shapes, bytes, routes), its hypers' checks, the fused update's
ways of seeing a param (views, a channels-last copy), 16-bit params, and torch's own checkpoints."""
import copy

import pytest
import torch
from torch import nn

import fastforeach
from fastforeach.memory import memory_report
from fastforeach.optim import Adafactor as TorchFaceAdafactor


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 32))


def grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params: p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1


def test_state_is_factored_for_matrices_and_whole_for_vectors():
    net = model()
    opt = fastforeach.Adafactor(net.parameters())
    grads(list(net.parameters()), 0)
    opt.step()
    weight, bias = net[0].weight, net[0].bias
    assert set(opt.state[weight]) == {'step', 'row_var', 'col_var'}
    assert opt.state[weight]['row_var'].shape == (256, 1) and opt.state[weight]['col_var'].shape == (1, 64)
    assert set(opt.state[bias]) == {'step', 'variance'} and opt.state[bias]['variance'].shape == (256,)
    # Counted: 4 bytes for each row and column of each matrix, and for each element of each vector.
    report = memory_report(net.parameters(), opt)
    rows_and_columns = (256 + 64) + (32 + 256)
    vectors = 256 * 3 + 32
    assert report['state'] == 4 * (rows_and_columns + vectors)  # the step counts are Python ints


@pytest.mark.parametrize('name,value,message', [
    ('eps1', 'none', r"Invalid eps1: 'none' \(must be 'auto' or a finite real number >= 0\)"),
    ('eps1', -1e-3, r"Invalid eps1: -0.001 \(must be a finite real number >= 0\)"),
    ('d', 0.5, r"Invalid d: 0.5 \(must be a finite real number >= 1\)"),
    ('beta2_decay', 0.2, r"Invalid beta2_decay: 0.2 \(must be a finite real number <= 0\)"),
    ('eps2', float('nan'), r"Invalid eps2: nan"),
])
def test_bad_hypers_are_refused_and_change_nothing(name, value, message):
    net = model()
    with pytest.raises(ValueError, match=message): fastforeach.Adafactor(net.parameters(), **{name: value})
    opt = fastforeach.Adafactor(net.parameters())
    grads(list(net.parameters()), 0)
    opt.step()
    good, before = opt.hypers[0][name], [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=message): opt.set_hyper(name, value)
    assert opt.hypers[0][name] == good
    opt.hypers[0][name] = value  # set behind the optimizer's back: refused at the next step, before any param moves
    with pytest.raises(ValueError, match=message): opt.step()
    for p, q in zip(net.parameters(), before): assert torch.equal(p, q)


@pytest.mark.parametrize('eps,message', [((None,), r"Invalid eps for param group 0: \(None,\) \(must be 2 numbers"),
                                         ((-1., 1e-3), r"Invalid eps\[0\] for param group 0: -1.0"),
                                         ((None, -2.), r"Invalid eps\[1\] for param group 0: -2.0"),
                                         (1e-3, r"Invalid eps for param group 0: 0.001")])
def test_the_torch_faces_eps_pair_is_checked(eps, message):
    with pytest.raises(ValueError, match=message): TorchFaceAdafactor(model().parameters(), eps=eps)


def test_fused_steps_a_channels_last_kernel_as_foreach_does():
    "The fused update sees a channels-last kernel's last two dims through a copy, written back: the same steps."
    def run(fused):
        torch.manual_seed(0)
        conv = nn.Conv2d(8, 16, 3).double().to(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        opt = fastforeach.Adafactor(conv.parameters(), wd=0.1, fused=fused)
        for i in range(5):
            grads(list(conv.parameters()), i)
            opt.step()
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        return conv.weight.detach(), opt.state[conv.weight]
    (w, s), (w_fused, s_fused) = run(False), run(True)
    torch.testing.assert_close(w_fused, w, rtol=1e-12, atol=1e-14)
    for key in ('row_var', 'col_var'): torch.testing.assert_close(s_fused[key], s[key], rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize('rounding', ['kahan', 'stochastic'])
def test_bf16_fused_follows_foreach(rounding):
    """bf16 params stepped in float32, written back in the fused update's own call, beside the foreach rule
    for 20 steps (the two round the bf16 state apart): with Kahan, each weight within a tenth of its move;
    stochastically rounded (fresh noise in each run), on average within a third of the average move plus
    half an ulp (the norm's weights, at 1, move by less than an ulp a step: noise is most of their move)."""
    def run(fused):
        net = model().bfloat16()
        start = [p.detach().float() for p in net.parameters()]
        opt = fastforeach.Adafactor(net.parameters(), lr=1e-2, fused=fused, rounding=rounding)
        for i in range(20):
            grads(list(net.parameters()), i)
            opt.step()
        comps = [opt.state[p].get('kahan_comp') for p in net.parameters()]
        return [p.detach().float() + (c.float() if c is not None else 0) for p, c in zip(net.parameters(), comps)], start
    (ours, start), (fused, _) = run(False), run(True)
    for a, b, s in zip(ours, fused, start):
        if rounding == 'kahan': assert (a - b).abs().max() <= 0.1 * (a - s).abs().max()
        else: assert (a - b).abs().mean() <= (a - s).abs().mean() / 3 + 2 ** -8 * s.abs().mean()


def test_auto_eps1_is_the_dtype_the_update_computes_in():
    "eps1='auto': float64's epsilon for float64 params, float32's for float32 and for bf16 (stepped in float32)."
    from fastforeach.optimizers.adafactor import floor_of
    assert floor_of('auto', torch.float64) == torch.finfo(torch.float64).eps
    assert floor_of('auto', torch.float32) == torch.finfo(torch.float32).eps
    assert floor_of(1e-6, torch.float32) == 1e-6
    # A zero gradient on a zero param: v floors at eps1², u = 0, nothing moves; no NaN from 0/0.
    p = nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    opt = fastforeach.Adafactor([p], fused=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, torch.zeros_like(p)) and torch.isfinite(opt.state[p]['row_var']).all()


def test_torch_checkpoints_load_both_ways():
    "torch.optim.Adafactor's state dict into the torch face and back: its keys and shapes, the same next steps."
    torch.manual_seed(0)
    theirs_net, ours_net = model().double(), model().double()
    ours_net.load_state_dict(theirs_net.state_dict())
    theirs = torch.optim.Adafactor(theirs_net.parameters(), weight_decay=0.1, foreach=False)
    for i in range(3):
        grads(list(theirs_net.parameters()), i)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(ours_net.parameters(), theirs_net.parameters()): p.copy_(q)
    ours = TorchFaceAdafactor(ours_net.parameters(), weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for i in range(3, 6):
        grads(list(theirs_net.parameters()), i); grads(list(ours_net.parameters()), i)
        theirs.step(); ours.step()
    for p, q in zip(ours_net.parameters(), theirs_net.parameters()): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    back = torch.optim.Adafactor(model().double().parameters(), weight_decay=0.1)
    back.load_state_dict(ours.state_dict())
    for i, s in ours.state_dict()['state'].items():
        assert set(s) == set(back.state_dict()['state'][i]) and s['step'].item() == 6
        for k in ('row_var', 'col_var', 'variance'):
            if k in s: assert s[k].shape == back.state_dict()['state'][i][k].shape


def test_fused_compiles_large_params_and_steps_small_ones_foreach(monkeypatch):
    """`fused=True`: params of `MIN_NUMEL` elements or more take the compiled update, smaller ones the foreach
    rule (cheaper on CPU); either way the same steps, every param compiled or none."""
    from fastforeach.fused import tensorwise
    calls, real = [], tensorwise.TensorwiseStep._call
    def counted(self, per_param, *args):
        calls.append([tuple(tensors[0].shape) for tensors in per_param])
        return real(self, per_param, *args)
    monkeypatch.setattr(tensorwise.TensorwiseStep, '_call', counted)

    def run(least):
        monkeypatch.setitem(tensorwise.MIN_NUMEL, 'cpu', least)
        net = model().double()
        opt = fastforeach.Adafactor(net.parameters(), wd=0.1, fused=True)
        for p in (net[0].bias, net[1].weight, net[1].bias): opt.state[p]['do_wd'] = False
        calls.clear()
        for i in range(5):
            grads(list(net.parameters()), i)
            opt.step()
        stepped = [shapes for shapes in calls if not {(8, 8, 1024), (1 << 16,)} & set(shapes)]  # not the compiles' warm-ups
        return [p.detach() for p in net.parameters()], stepped
    (mixed, some), (every, all_), (none, no_calls) = run(1 << 13), run(0), run(1 << 30)
    # Both matrices (16,384 and 8,192 elements) in one call a step: they take weight decay, the rest do not.
    assert some == [[(256, 64), (32, 256)]] * 5 and not no_calls
    assert sorted(shape for shapes in all_ for shape in shapes) == sorted([(256, 64), (32, 256), (256,), (32,), (256,), (256,)] * 5)
    for a, b, c in zip(mixed, every, none):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-15)
