"""State not shaped like its param: a test-only rule keeps a scalar and a factored (row, column) second
moment (reduced dims kept, of size 1), as Adafactor does, declared with `rules.declare(state=...)`. The
core creates, steps, saves, loads and checks it from the declaration alone; the elementwise fused forms
decline it, saying why."""
import copy

import pytest
import torch

from fastforeach import ForEachOptimizer
from fastforeach.fused import Coefficients, CompiledStep
from fastforeach.rules import COLUMNS, ROWS, SCALAR, StepRule, declare


@declare(state={'steps': SCALAR, 'row_avg': ROWS, 'col_avg': COLUMNS})
def factored_rms_step(p, g, steps, row_avg, col_avg, *, lr, sqr_mom, eps):
    """steps ← steps + 1;  row_avg, col_avg ← averages of g² over each row and each column (debiased by steps);
    p ← p − lr·g / (√(row_avg ⊗ col_avg / mean(row_avg)) + eps)"""
    torch._foreach_add_(steps, 1)
    for pi, gi, n, rows, cols in zip(p, g, steps, row_avg, col_avg):
        sq = gi * gi
        rows.lerp_(sq.mean(-1, keepdim=True), 1 - sqr_mom)
        cols.lerp_(sq.mean(-2, keepdim=True), 1 - sqr_mom)
        debias = 1 - sqr_mom ** n
        v = rows * cols / rows.mean(-2, keepdim=True) / debias
        pi.addcdiv_(gi, v.sqrt() + eps, value=-lr)


def reference(params, grads_per_step, lr, sqr_mom, eps):
    "The same rule, one tensor at a time, written out plainly."
    params = [p.detach().clone() for p in params]
    rows = [torch.zeros(p.shape[:-1], dtype=p.dtype) for p in params]
    cols = [torch.zeros((*p.shape[:-2], p.shape[-1]), dtype=p.dtype) for p in params]  # dims dropped here
    for n, grads in enumerate(grads_per_step, 1):
        for p, g, r, c in zip(params, grads, rows, cols):
            r.mul_(sqr_mom).add_((g * g).mean(-1), alpha=1 - sqr_mom)
            c.mul_(sqr_mom).add_((g * g).mean(-2), alpha=1 - sqr_mom)
            v = r[..., :, None] * c[..., None, :] / r.mean(-1)[..., None, None] / (1 - sqr_mom ** n)
            p -= lr * g / (v.sqrt() + eps)
    return params, [r[..., None] for r in rows], [c[..., None, :] for c in cols]


SHAPES = [(16, 8), (4, 3, 5), (2, 3, 3, 3)]  # a matrix, a stack of matrices, a conv kernel
HYPERS = dict(lr=1e-2, sqr_mom=0.9, eps=1e-8)


def make(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]
    return ForEachOptimizer(params, factored_rms_step, **HYPERS), params


def grads(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        for p, gi in zip(params, grads(i, params[0].dtype)): p.grad = gi.clone()
        opt.step()


def test_declared_state_is_read_off_the_rule():
    rule = StepRule.of(factored_rms_step)
    assert rule.state_keys == ('steps', 'row_avg', 'col_avg') and not rule.like_params
    p = torch.zeros(4, 3, 5)
    assert [rule.state[k].shape_for(p) for k in rule.state_keys] == [(), (4, 3, 1), (4, 1, 5)]


def test_steps_like_its_reference():
    opt, params = make()
    run(opt, params, 30)
    expected, rows, cols = reference(params=make()[1], grads_per_step=[grads(i) for i in range(30)], **HYPERS)
    for p, e, r, c in zip(params, expected, rows, cols):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
        state = opt.state[p]
        assert state['steps'].shape == () and state['steps'].item() == 30
        torch.testing.assert_close(state['row_avg'], r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state['col_avg'], c, rtol=1e-12, atol=1e-12)


def test_checkpoint_resumes_exactly():
    whole, whole_params = make()
    run(whole, whole_params, 20)
    first, first_params = make()
    run(first, first_params, 10)
    sd = copy.deepcopy(first.state_dict())
    resumed, resumed_params = make()
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params): p.copy_(q)
    resumed.load_state_dict(sd)
    run(resumed, resumed_params, 10, start=10)
    for p, q in zip(resumed_params, whole_params): assert torch.equal(p, q)
    for p, q in zip(resumed_params, whole_params):
        for k in ('steps', 'row_avg', 'col_avg'): assert torch.equal(resumed.state[p][k], whole.state[q][k])


@pytest.mark.parametrize('key, bad, message', [
    ('row_avg', lambda t: torch.zeros(*t.shape, 2), r"param group 0, param 1 \(shape \(4, 3, 5\)\): state 'row_avg' has shape"),
    ('col_avg', lambda t: torch.zeros(t.numel() + 1), r"state 'col_avg' has shape \(21,\), expected \(4, 1, 5\)"),
    ('steps', lambda t: torch.zeros(1), r"state 'steps' has shape \(1,\), expected \(\)"),
    ('steps', lambda t: 3, r"state 'steps' is a int"),
])
def test_wrong_shaped_state_is_refused_and_changes_nothing(key, bad, message):
    opt, params = make()
    run(opt, params, 3)
    sd = opt.state_dict()
    sd['state'][1][key] = bad(sd['state'][1][key])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message): opt.load_state_dict(sd)
    after = opt.state_dict()
    for s, t in zip(before['state'], after['state']):
        for k in s: assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k])), k


def test_bf16_params_step_on_float32_working_values():
    "16-bit params with Kahan summation: the factored state is stepped in float32 copies, in its own dtype."
    opt32, p32 = make(torch.float32)
    opt16, p16 = make(torch.bfloat16)
    run(opt32, p32, 5); run(opt16, p16, 5)
    for p, q in zip(p16, p32):
        assert opt16.state[p]['row_avg'].dtype == torch.bfloat16 and 'kahan_comp' in opt16.state[p]
        # The params move about 0.1 in 5 steps; bf16 gradients and state (rounded to 2^-8 of themselves) keep the
        # float32 weights the bf16 ones stand for within a fifth of that.
        torch.testing.assert_close(p.float() + opt16.state[p]['kahan_comp'], q.detach(), rtol=0, atol=0.02)


def test_fused_forms_decline_it_saying_why():
    with pytest.raises(TypeError, match=r"factored_rms_step has no fused form: its state \['steps', 'row_avg', 'col_avg'\] "
                                        "is not shaped like its param"):
        CompiledStep(factored_rms_step, lambda p, g, s, r, c, k: None, lambda **h: {}, Coefficients('lr'))
