"""The core serves any face: driven here with plain dicts for the hypers and the state, as a torch.optim face
would drive it, it steps exactly as the fastai face (`ForEachOptimizer`) over the same core does."""
from collections import defaultdict

import pytest
import torch

import fastforeach
from fastforeach.core import Core
from fastforeach.optimizers.adam import adam_step, fused_adam_step
from fastforeach.optimizers.radam import fused_radam_step, radam_step
from fastforeach.testing.oracle import oracle_layers

HYPERS = {'lr': 1e-3, 'mom': 0.9, 'sqr_mom': 0.99, 'eps': 1e-5, 'wd': 0.01, 'beta': 0.}
CASES = {'adam': (adam_step, fastforeach.Adam), 'adam-fused': (fused_adam_step, fastforeach.Adam),
         'radam': (radam_step, fastforeach.RAdam), 'radam-fused': (fused_radam_step, fastforeach.RAdam)}


def copies(groups): return [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in groups]


@pytest.mark.parametrize('case', CASES)
def test_the_core_steps_plain_containers_as_the_fastai_face(case):
    opt_step, factory = CASES[case]
    groups = oracle_layers(torch.float64)
    ours, theirs = copies(groups), copies(groups)
    core, state = Core(opt_step), defaultdict(dict)
    hypers = [{**HYPERS, 'lr': HYPERS['lr'] * (i + 1)} for i in range(len(ours))]
    face = factory(theirs, lr=[h['lr'] for h in hypers], wd=HYPERS['wd'], fused=case.endswith('fused'))
    core.hold([p for g in ours for p in g])
    for p, q in zip(sum(ours, []), sum(theirs, [])):
        if p.ndim <= 1: state[p]['do_wd'] = False; face.state[q]['do_wd'] = False
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p, q in zip(sum(ours, []), sum(theirs, [])):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype); q.grad = p.grad.clone()
        core.check_hypers(hypers)
        with torch.no_grad(): core.step(list(zip(hypers, ours)), state)
        face.step()
    for p, q in zip(sum(ours, []), sum(theirs, [])):
        assert torch.equal(p, q)
        for key in ('grad_avg', 'sqr_avg', 'step'): assert torch.equal(torch.as_tensor(state[p][key]), torch.as_tensor(face.state[q][key]))


def test_the_core_checks_hypers_by_group():
    core = Core(adam_step)
    with pytest.raises(ValueError, match=r"Invalid mom for param group 1: 1.5"):
        core.check_hypers([dict(HYPERS), {**HYPERS, 'mom': 1.5}])
