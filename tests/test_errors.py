"""Bad input gets a clear error naming the parameter and its value, and changes nothing."""
import copy
import inspect

import pytest
import torch
from torch import nn

import fastforeach
from fastforeach.testing.oracle import oracle_layers
from fastforeach.registry import REGISTRY

FACTORIES = {name: getattr(fastforeach, name) for name in REGISTRY if REGISTRY[name].factory}

# hyper -> values outside its range
BAD_VALUES = {
    'lr': [-1e-3, float('nan')], 'mom': [-0.1, 1.0, 1.5], 'sqr_mom': [-0.1, 1.0], 'eps': [-1e-8],
    'wd': [-0.01, float('inf')], 'beta': [-1.], 'nu_1': [-0.1, 1.1], 'nu_2': [1.5], 'trust_coeff': [-0.02],
    'k': [0, -1, 2.5], 'alpha': [0., -0.5, 1.5], 'beta1': [-0.1, 1.0], 'beta2': [1.5], 'beta3': [-0.5, 1.0],
    'ns_method': ['fast', 3], 'adjust_lr': ['rms'], 'ns_steps': [0, 100, 2.5],
}
CASES = [pytest.param(name, hyper, value, id=f"{name}-{hyper}={value}")
         for name, factory in FACTORIES.items()
         for hyper in inspect.signature(factory).parameters if hyper in BAD_VALUES
         for value in BAD_VALUES[hyper]]


def stepped(name, steps=2, **options):
    "A fastforeach optimizer that has taken `steps` steps on the oracle layers, and its params."
    groups = oracle_layers(torch.float64)
    opt = FACTORIES[name](groups, REGISTRY[name].lr, **options) if name in FACTORIES else \
        REGISTRY[name].make('foreach', groups)
    for _ in range(steps): give_grads(groups); opt.step()
    give_grads(groups)
    return opt, groups


def give_grads(groups):
    for p in [p for g in groups for p in g][:-1]: p.grad = torch.randn_like(p)


def snapshot(opt, groups):
    return copy.deepcopy(([p.detach() for g in groups for p in g], opt.state_dict()))


def assert_unchanged(before, after):
    params_a, sd_a = before
    params_b, sd_b = after
    for a, b in zip(params_a, params_b): assert torch.equal(a, b)
    assert sd_a['hypers'] == sd_b['hypers'] if 'hypers' in sd_a else True
    for sa, sb in zip(sd_a['state'], sd_b['state']):
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert sd_a.get('count') == sd_b.get('count')


@pytest.mark.parametrize('name,hyper,value', CASES)
def test_bad_hyper_at_construction(name, hyper, value):
    with pytest.raises(ValueError, match=rf"Invalid {hyper}.*{value}"):
        FACTORIES[name](oracle_layers(), **{'lr': 1e-3, hyper: value})


@pytest.mark.parametrize('name,hyper,value', [c for c in CASES if c.values[1] not in ('k', 'alpha')])
def test_bad_hyper_set_later_changes_nothing(name, hyper, value):
    opt, groups = stepped(name)
    before = snapshot(opt, groups)
    with pytest.raises(ValueError, match=rf"Invalid {hyper}.*{value}"):
        opt.set_hyper(hyper, value)
    with pytest.raises(ValueError, match=rf"Invalid {hyper}.*{value}"):
        opt.set_hypers(**{hyper: [0.5 * REGISTRY[name].lr if hyper == 'lr' else opt.hypers[0][hyper], value]})
    # A value written straight into the hypers is caught by the next step, before any tensor moves.
    kept, opt.hypers[-1][hyper] = opt.hypers[-1][hyper], value
    with pytest.raises(ValueError, match=rf"Invalid {hyper} for param group 1.*{value}"):
        opt.step()
    opt.hypers[-1][hyper] = kept
    assert_unchanged(before, snapshot(opt, groups))


@pytest.mark.parametrize('name', ['Lookahead', 'ranger'])
def test_bad_lookahead_set_later(name):
    opt, groups = stepped(name)
    before = snapshot(opt, groups)
    opt.k = 0
    with pytest.raises(ValueError, match=r"Invalid k: 0"): opt.step()
    assert_unchanged(before, snapshot(opt, groups))


def test_unknown_keyword_is_a_type_error():
    for name, factory in FACTORIES.items():
        with pytest.raises(TypeError, match='momentum'): factory(oracle_layers(), 1e-3, momentum=0.9)


def test_sparse_gradients_are_refused_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 2)
    opt = fastforeach.Adam([list(lin.parameters()), list(emb.parameters())], 1e-3)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match='sparse gradients'): opt.step()
    for a, b in zip(before, (*lin.parameters(), *emb.parameters())): assert torch.equal(a, b)
    assert all(not opt.state[p] for p in lin.parameters())


STATE_DICT_BREAKS = {
    'one group too many': (lambda sd: sd['hypers'].append(dict(sd['hypers'][0])), r"2 param groups|3 param groups"),
    'one param too few': (lambda sd: sd['state'].pop(), r"params, the optimizer has"),
    'missing state key': (lambda sd: sd['state'][0].pop('grad_avg'), r"param group 0, param 0 .*missing state 'grad_avg'"),
    'mis-shaped state': (lambda sd: sd['state'][3].update(grad_avg=torch.zeros(3)),
                         r"param group 0, param 3 .*'grad_avg' has shape \(3,\)"),
    'state not a tensor': (lambda sd: sd['state'][2].update(sqr_avg=0.5), r"param group 0, param 2 .*'sqr_avg' is a float"),
    'bad step': (lambda sd: sd['state'][1].update(step=-2), r"param group 0, param 1 .*'step' is -2"),
    'bad hyper': (lambda sd: sd['hypers'][1].update(lr=-1.), r"Invalid lr in the state dict's param group 1: -1.0"),
}


@pytest.mark.parametrize('break_it', list(STATE_DICT_BREAKS))
@pytest.mark.parametrize('name', ['Adam', 'ranger'])
def test_bad_state_dict_is_refused_whole(name, break_it):
    opt, groups = stepped(name)
    sd = copy.deepcopy(opt.state_dict())
    for _ in range(2): give_grads(groups); opt.step()  # the optimizer moves on from the saved state
    before = snapshot(opt, groups)
    mutate, message = STATE_DICT_BREAKS[break_it]
    mutate(sd)
    with pytest.raises(ValueError, match=message): opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(opt, groups))


@pytest.mark.parametrize('break_it,message', [
    (lambda sd: sd.pop('count'), "'count' and 'slow_weights'"),
    (lambda sd: sd.update(count=-1), "'count' is -1"),
    (lambda sd: sd['slow_weights'][1].pop(), "'slow_weights' group 1 has"),
    (lambda sd: sd['slow_weights'][0].__setitem__(2, torch.zeros(2)), r"'slow_weights' group 0, param 2 has shape \(2,\)"),
    (lambda sd: sd['slow_weights'][1].__setitem__(0, [1., 2.]), r"'slow_weights' group 1, param 0 is a list, expected a tensor"),
])
def test_bad_lookahead_state_dict_is_refused_whole(break_it, message):
    opt, groups = stepped('ranger')
    sd = copy.deepcopy(opt.state_dict())
    before = snapshot(opt, groups)
    break_it(sd)
    kept = copy.deepcopy(sd)
    with pytest.raises(ValueError, match=message): opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(opt, groups))
    assert sd.keys() == kept.keys()  # the caller's dict is not consumed


def test_a_lone_tensor_is_one_param_as_in_fastai():
    p = nn.Parameter(torch.randn(3, 4))
    assert len(fastforeach.SGD(p, 1e-2).param_lists[0]) == len(fastforeach.SGD(p, 1e-2, foreach=False).param_lists[0]) == 1


def test_empty_params_are_refused():
    with pytest.raises(ValueError, match='empty'): fastforeach.Adam([], 1e-3)
