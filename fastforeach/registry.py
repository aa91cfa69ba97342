"""The one table of optimizers: it makes the factories and drives the tests and the benchmark.

Each row names a fastai factory and the fastforeach class that does the same job, and the option sets
(`configs`) that together exercise every option fastai has for it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import fastai.optimizer as native
import torch

from .lookahead import Lookahead, RangerForEachOptimizer
from .optimizers.adafactor import AdafactorForEachOptimizer, native_adafactor
from .optimizers.adam import AdamForEachOptimizer
from .optimizers.adan import AdanForEachOptimizer, native_adan
from .optimizers.lamb import LambForEachOptimizer
from .optimizers.larc import LarcForEachOptimizer
from .optimizers.lion import LionForEachOptimizer, native_lion
from .optimizers.muon import MuonForEachOptimizer, native_muon
from .optimizers.qhadam import QHAdamForEachOptimizer
from .optimizers.radam import RAdamForEachOptimizer
from .optimizers.rmsprop import RMSPropForEachOptimizer
from .optimizers.schedulefree import ScheduleFreeAdamForEachOptimizer, native_schedule_free_adam
from .optimizers.sgd import SGDForEachOptimizer
from .optimizers.stableadam import StableAdamForEachOptimizer, native_stable_adam
from .precision import SEEDED, check_rounding

__all__ = ['OptimizerSpec', 'REGISTRY', 'make_factory']


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    native: Callable        # fastai's factory: (params, lr, **options) -> fastai Optimizer (see `in_fastai`)
    foreach: Callable       # the same signature, plus keyword-only `fused` -> fastforeach optimizer
    configs: dict = field(default_factory=dict)  # config name -> options (besides params and lr)
    reference: Callable = None  # what tests and benchmarks compare with, when not exactly `native`
    lr: float = 1e-2        # a learning rate that suits it in tests and benchmarks
    factory: bool = True    # whether `fastforeach.<name>` is made from this row
    # Whether `native` is fastai's own. The optimizers fastai lacks have a fastai-style one of fastforeach's
    # (per-param steppers), held to the published implementations by tests/test_references.py.
    in_fastai: bool = True
    # Options `make` adds for tests and the benchmark (which give their own over them): Muon's Newton-Schulz
    # in float64, where one matrix at a time (fastai-style) and batched agree to 1e-10, as in bf16 they do not.
    make_options: dict = field(default_factory=dict)

    def make(self, impl: str, params, lr=None, **options):
        "Build the optimizer with `impl` in IMPLEMENTATIONS."
        if impl not in IMPLEMENTATIONS: raise ValueError(f"Invalid impl: {impl!r} (must be one of {IMPLEMENTATIONS})")
        lr = self.lr if lr is None else lr
        options = {**self.make_options, **options}
        if impl == 'native': return (self.reference or self.native)(params, lr, **options)
        return self.foreach(params, lr, **options, fused=impl == 'fused')


IMPLEMENTATIONS = ('native', 'foreach', 'fused')


def every_matrix(p) -> bool:
    "A Muon route that keeps the head too (the registry's `route` config)."
    return p.ndim >= 2


def _rmsprop_reference(params, lr, eps=1e-8, **options):
    "fastai's RMSProp with the `eps` it is given: fastai's own drops its `eps` argument and keeps 1e-8."
    opt = native.RMSProp(params, lr, **options)
    opt.set_hypers(eps=eps)
    return opt


def _native_lookahead(params, lr, k=6, alpha=0.5, **options):
    return native.Lookahead(native.SGD(params, lr, **options), k=k, alpha=alpha)


def _foreach_lookahead(params, lr, k=6, alpha=0.5, *, fused=False, **options):
    return Lookahead(SGDForEachOptimizer(params, lr, **options, fused=fused), k=k, alpha=alpha, fused=fused)


_WD = {'wd': 0.01}
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec('SGD', native.SGD, SGDForEachOptimizer, {
        'plain': {}, 'wd': _WD, 'mom': {'mom': 0.9}, 'mom_wd': {'mom': 0.9, **_WD},
        'mom_l2': {'mom': 0.9, **_WD, 'decouple_wd': False}}),
    OptimizerSpec('RMSProp', native.RMSProp, RMSPropForEachOptimizer, {
        'plain': {}, 'wd': _WD, 'mom': {'mom': 0.9, 'sqr_mom': 0.9}, 'mom_l2': {'mom': 0.8, **_WD, 'decouple_wd': False},
        'eps': {'eps': 1e-3}}, reference=_rmsprop_reference, lr=1e-3),
    OptimizerSpec('Adam', native.Adam, AdamForEachOptimizer, {
        'default': {}, 'no_wd': {'wd': 0.}, 'l2': {'decouple_wd': False},
        'betas_eps': {'mom': 0.8, 'sqr_mom': 0.9, 'eps': 1e-3, 'wd': 0.1}, 'no_mom': {'mom': 0.}}, lr=1e-3),
    OptimizerSpec('RAdam', native.RAdam, RAdamForEachOptimizer, {
        'default': {}, 'wd': _WD, 'l2': {**_WD, 'decouple_wd': False}, 'sadam': {'beta': 5., **_WD},
        'betas_eps': {'mom': 0.8, 'sqr_mom': 0.9, 'eps': 0.}}, lr=1e-3),
    OptimizerSpec('QHAdam', native.QHAdam, QHAdamForEachOptimizer, {
        'default': {}, 'wd': _WD, 'l2': {**_WD, 'decouple_wd': False},
        'nus': {'nu_1': 0.5, 'nu_2': 0.8, 'mom': 0.9, 'sqr_mom': 0.99, 'eps': 1e-5}}, lr=1e-3),
    OptimizerSpec('Larc', native.Larc, LarcForEachOptimizer, {
        'larc': {}, 'larc_wd': _WD, 'lars': {'clip': False}, 'lars_l2': {'clip': False, **_WD, 'decouple_wd': False},
        'no_mom': {'mom': 0.}, 'lars_no_mom': {'mom': 0., 'clip': False, 'trust_coeff': 0.05, 'eps': 1e-6}}, lr=0.1),
    OptimizerSpec('Lamb', native.Lamb, LambForEachOptimizer, {
        'default': {}, 'wd': _WD, 'l2': {**_WD, 'decouple_wd': False}, 'betas_eps': {'mom': 0.8, 'sqr_mom': 0.9, 'eps': 1e-3}},
        lr=1e-3),
    OptimizerSpec('ranger', native.ranger, RangerForEachOptimizer, {
        'default': {}, 'l2': {'decouple_wd': False}, 'k_alpha': {'k': 3, 'alpha': 0.8, 'sqr_mom': 0.9},
        'sadam': {'beta': 5., 'k': 2, 'alpha': 1.0}, 'mom_wd_eps': {'mom': 0.9, 'wd': 0., 'eps': 1e-5}}, lr=1e-3),
    OptimizerSpec('Lookahead', _native_lookahead, _foreach_lookahead, {
        'default': {}, 'k_alpha': {'k': 2, 'alpha': 0.3, 'mom': 0.9, 'wd': 0.01}}, factory=False),
    OptimizerSpec('Lion', native_lion, LionForEachOptimizer, {
        'default': {}, 'no_wd': {'wd': 0.}, 'l2': {'wd': 0.01, 'decouple_wd': False}, 'betas': {'beta1': 0.8, 'beta2': 0.95}},
        lr=3e-4, in_fastai=False),
    OptimizerSpec('Adan', native_adan, AdanForEachOptimizer, {
        'default': {}, 'no_wd': {'wd': 0.}, 'l2': {'decouple_wd': False},
        'betas_eps': {'beta1': 0.9, 'beta2': 0.8, 'beta3': 0.95, 'eps': 1e-3}}, lr=1e-3, in_fastai=False),
    OptimizerSpec('StableAdam', native_stable_adam, StableAdamForEachOptimizer, {
        'default': {}, 'no_wd': {'wd': 0.}, 'l2': {'decouple_wd': False}, 'clipping': {'mom': 0.8, 'sqr_mom': 0.999, 'eps': 1e-8, 'wd': 0.1}},
        lr=1e-3, in_fastai=False),
    OptimizerSpec('ScheduleFreeAdam', native_schedule_free_adam, ScheduleFreeAdamForEachOptimizer, {
        'default': {}, 'wd': _WD, 'l2': {**_WD, 'decouple_wd': False},
        'warmup': {'warmup_steps': 10, 'r': 1., 'weight_lr_power': 1., 'beta1': 0.8, 'sqr_mom': 0.99, 'eps': 1e-6}},
        lr=2.5e-3, in_fastai=False),
    OptimizerSpec('Muon', native_muon, MuonForEachOptimizer, {
        'default': {}, 'l2': {'decouple_wd': False, 'wd': 0.01},
        'plain': {'nesterov': False, 'mom': 0.9, 'adjust_lr': 'original', 'ns_steps': 3},
        'adamw': {'sqr_mom': 0.99, 'eps': 1e-5, 'adjust_lr': 'none', 'ns_dtype': torch.float64, 'ns_method': 'standard'},
        'route': {'route': every_matrix}}, lr=2e-3, in_fastai=False,
        make_options={'ns_dtype': torch.float64}),
    OptimizerSpec('Adafactor', native_adafactor, AdafactorForEachOptimizer, {
        'default': {}, 'wd': _WD, 'l2': {**_WD, 'decouple_wd': False},
        'decay_eps_d': {'beta2_decay': -0.5, 'eps1': 1e-6, 'eps2': 1e-2, 'd': 2., 'wd': 0.1}}, in_fastai=False),
]}


# The switches every factory adds to fastai's signature, keyword-only, with their defaults.
SWITCHES = {'foreach': (True, bool), 'fused': (False, bool), 'rounding': ('kahan', str),
            'kahan_dtype': (torch.float32, torch.dtype), 'state_format': (None, object)}


def make_factory(spec: OptimizerSpec) -> Callable:
    """`fastforeach.<name>`: fastai's factory signature plus keyword-only `foreach`, `fused`, `rounding`,
    `kahan_dtype` and `state_format` (averages in 8 or 4 bits: see `lowbit.py`).

    `foreach=True` builds the fastforeach optimizer, one pass over memory per step with `fused=True`, with
    16-bit params written back as `rounding` says (see `precision.py`); `foreach=False` returns fastai's
    own, which rounds 16-bit params to nearest."""
    sig = inspect.signature(spec.native)
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
             for name, (default, kind) in SWITCHES.items()]
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))

    def factory(*args, foreach: bool = True, fused: bool = False, rounding: str = 'kahan',
                kahan_dtype: torch.dtype = torch.float32, state_format=None, **kwargs):
        bound = sig.bind(*args, **kwargs)  # TypeError for an unknown keyword, as a plain function gives
        for name, flag in (('foreach', foreach), ('fused', fused)):
            if not isinstance(flag, bool): raise ValueError(f"Invalid {name}: {flag!r} (must be True or False)")
        check_rounding(rounding, kahan_dtype)
        if not foreach and (fused or rounding in SEEDED or kahan_dtype != torch.float32 or state_format is not None):
            given = 'fused=True' if fused else f"rounding={rounding!r}" if rounding in SEEDED else \
                f"kahan_dtype={kahan_dtype}" if kahan_dtype != torch.float32 else f"state_format={state_format!r}"
            raise ValueError(f"Invalid options for {spec.name}: {given} with foreach=False (fastai's native "
                             "optimizers have no fused form, keep full-precision state and round 16-bit params to "
                             "nearest)")
        if not foreach: return spec.native(*bound.args, **bound.kwargs)
        return spec.foreach(*bound.args, **bound.kwargs, fused=fused, rounding=rounding, kahan_dtype=kahan_dtype,
                            state_format=state_format)

    factory.__name__ = factory.__qualname__ = spec.name
    # Where the factories live: pickle finds them by name there (fastai's `Learner.export` pickles `opt_func`).
    factory.__module__ = 'fastforeach'
    what = (f"fastai's `{spec.name}` with the same parameters and defaults" if spec.in_fastai else
            f"{spec.name}, with fastai's vocabulary and the defaults of its paper")
    native = "fastai's native optimizer" if spec.in_fastai else "a fastai `Optimizer` of per-param steppers"
    factory.__doc__ = (f"{what}. `foreach=True` (the default) "
                       f"gives `{spec.foreach.__name__}`, with `fused=True` its one-pass fused step; "
                       f"`foreach=False` gives {native}. 16-bit params are written back with "
                       "`rounding`: 'kahan' (a compensation buffer in `kahan_dtype`), 'master24' (an int8 buffer: "
                       "24-bit master weights), 'stochastic', or 'nearest' "
                       "(fastai's own steps). `state_format` ('8bit', '4bit', '8bit-companded', a dict of state key -> "
                       "format, or a `StateFormat`) keeps its averages in few bits.")
    factory.__signature__ = sig.replace(parameters=params[:at] + flags + params[at:])
    return factory
