"""ScheduleFreeAdam in a Learner: the `ScheduleFree` callback trains at y and validates, predicts and saves at x."""
from functools import partial

import pytest
import torch

import fastforeach
from fastforeach.testing.training import digits_learner


def learner(fused=False, cbs=None, **kwargs):
    return digits_learner(partial(fastforeach.ScheduleFreeAdam, fused=fused),
                          cbs=[fastforeach.ScheduleFree()] if cbs is None else cbs, **kwargs)


@pytest.mark.parametrize('fused', [False, True])
def test_fit_ends_in_eval_mode_at_the_averaged_weights(fused):
    learn = learner(fused, n_train=1280)
    with learn.no_logging(), learn.no_bar(): learn.fit(3, 3e-2)
    opt = learn.opt
    assert not any(h['train_mode'] for h in opt.hypers)
    x = [p.detach().clone() for p in learn.model.parameters()]
    opt.train()
    y = [p.detach().clone() for p in learn.model.parameters()]
    opt.eval()
    for p, a in zip(learn.model.parameters(), x): torch.testing.assert_close(p.detach(), a)
    assert any(not torch.allclose(a, b) for a, b in zip(x, y))
    with learn.no_logging(), learn.no_bar(): assert learn.validate()[1] > 0.9


def test_validation_recomputes_batch_norm_statistics_at_x():
    "The statistics validation used are those of the first training batches run through the model at x."
    learn = learner(cbs=[fastforeach.ScheduleFree(bn_batches=3)], shuffle=False)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-2)
    norms = [learn.model[1], learn.model[4]]
    assert all(bn.num_batches_tracked.item() == 3 and bn.momentum == 0.1 for bn in norms)
    seen = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in norms]
    for bn in norms: bn.reset_running_stats(); bn.momentum = None
    learn.model.train()
    with torch.no_grad():
        for i, (xb, _) in enumerate(learn.dls.train):
            if i == 3: break
            learn.model(xb)
    for bn, (mean, var) in zip(norms, seen):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)


def test_fine_tune_save_and_load_resume(tmp_path):
    "fine_tune switches modes per fit; a checkpoint saved at x resumes as if never stopped."
    learn = learner(path=tmp_path, shuffle=False)
    with learn.no_logging(), learn.no_bar():
        learn.fine_tune(1, 1e-2, freeze_epochs=1)
        learn.save('sf', with_opt=True)
        learn.fit(1, 1e-2)
    resumed = learner(path=tmp_path, shuffle=False)
    resumed.create_opt()
    resumed.load('sf', with_opt=True)
    assert not any(h['train_mode'] for h in resumed.opt.hypers)
    with resumed.no_logging(), resumed.no_bar(): resumed.fit(1, 1e-2)
    for a, b in zip(learn.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_the_callback_refuses_other_optimizers():
    learn = digits_learner(fastforeach.Adam, cbs=[fastforeach.ScheduleFree()])
    with pytest.raises(ValueError, match='schedule-free optimizer'), learn.no_logging(), learn.no_bar(): learn.fit(1)


def test_bad_bn_batches():
    with pytest.raises(ValueError, match='Invalid bn_batches: -1'): fastforeach.ScheduleFree(bn_batches=-1)


@pytest.mark.parametrize('fused', [False, True])
def test_pure_bf16_keeps_z_in_float32_and_switches_modes_on_working_values(fused):
    "z is a weight: float32 for bf16 params; eval() then train() gives y back to float32 rounding (Kahan)."
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = fastforeach.ScheduleFreeAdam([p], lr=1e-2, fused=fused)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        p.grad = torch.randn(64, generator=gen).bfloat16()
        opt.step()
    state = opt.state[p]
    assert state['z'].dtype == torch.float32 and state['sqr_avg'].dtype == torch.bfloat16
    y = p.detach().float() + state['kahan_comp']
    opt.eval()
    x = p.detach().float() + state['kahan_comp']
    torch.testing.assert_close(x, y + (1 - 1 / 0.9) * (state['z'] - y), rtol=0, atol=1e-6)
    opt.train()
    torch.testing.assert_close(p.detach().float() + state['kahan_comp'], y, rtol=0, atol=1e-6)


def test_fused_bf16_compiles_its_float32_z_before_the_step(monkeypatch):
    """The compile on dummies before a step covers z's float32 (packed and per tensor): the steps find their
    graphs. (Fresh compiled functions: graphs other tests compiled would hide a miss.)"""
    from torch._dynamo.utils import counters

    import fastforeach.fused.compile as compiling
    monkeypatch.setattr(compiling, '_COMPILED', {})
    monkeypatch.setattr(compiling, '_CHECKED', {})
    small, big = (torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16)) for n in (100, 100_000))
    opt = fastforeach.ScheduleFreeAdam([small, big], lr=1e-2, fused=True)
    hypers = {**{k: opt.hypers[0][k] for k in opt.rule.hypers}, 'step': 1, 'weight_sum': 1e-4, 'lr_max': 1e-2}
    assert opt.fused.ready(small, hypers, opt.rounding)
    before = counters['stats']['unique_graphs']
    for _ in range(2):
        for p in (small, big): p.grad = torch.randn_like(p)
        opt.step()
    assert counters['stats']['unique_graphs'] == before
