"""`from fastforeach import *` replaces `from fastai.optimizer import *`: every name fastai's module exports is
there, fastforeach's factories in place of fastai's, every other name fastai's own object."""
import inspect

import fastai.optimizer

import fastforeach


def star_import(module: str) -> dict:
    namespace = {}
    exec(f"from {module} import *", namespace)
    namespace.pop('__builtins__')
    return namespace


def test_star_import_gives_every_name_of_fastai_optimizer():
    ours, fastais = star_import('fastforeach'), star_import('fastai.optimizer')
    assert set(fastais) <= set(ours), sorted(set(fastais) - set(ours))
    for name, obj in fastais.items():
        if name in fastforeach.OWN: assert ours[name] is not obj, f"{name} is still fastai's"
        else: assert ours[name] is obj, f"{name} is not fastai's own"
    assert set(ours) == set(fastforeach.__all__)


def parameters(fn) -> dict:
    "name -> (kind, default) of `fn`'s parameters (annotations aside: fastai's Lookahead annotates its `opt`)."
    return {k: (p.kind, p.default) for k, p in inspect.signature(fn).parameters.items()}


def test_own_factories_keep_fastais_signatures_plus_switches():
    for name in fastforeach.OWN:
        ours, fastais = parameters(getattr(fastforeach, name)), parameters(getattr(fastai.optimizer, name))
        extra = [k for k in ours if k not in fastais]
        assert {k: v for k, v in ours.items() if k not in extra} == fastais, name
        assert set(extra) <= {'foreach', 'fused', 'rounding', 'kahan_dtype', 'state_format'}, name
        assert all(ours[k][0] is inspect.Parameter.KEYWORD_ONLY for k in extra), name


def test_fastai_steppers_build_a_native_optimizer():
    "What fastai's module exports for custom optimizers works through fastforeach's namespace."
    import torch
    ns = star_import('fastforeach')
    p = torch.nn.Parameter(torch.ones(3))
    opt = ns['Optimizer']([p], [ns['weight_decay'], ns['sgd_step']], lr=0.1, wd=0.5)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 1 * (1 - 0.1 * 0.5) - 0.1))


def test_factories_pickle_by_name():
    "fastai's `Learner.export` pickles `opt_func`: a factory must be found again under its name."
    import pickle
    for name in fastforeach.OWN: assert pickle.loads(pickle.dumps(getattr(fastforeach, name))) is getattr(fastforeach, name)

