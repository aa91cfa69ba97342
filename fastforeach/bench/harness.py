"""What the benchmark steps and how it times them: the contenders of each optimizer (fastai native,
foreach, fused, torch.optim's equal, the published reference), interleaved timing, and the check that
each contender's results equal fastai native's."""
from __future__ import annotations

import inspect
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import fastai.optimizer as native
import torch
from torch import nn

from .. import optim
from ..callbacks import ScheduleFree
from ..registry import IMPLEMENTATIONS, REGISTRY, OptimizerSpec
from ..testing.oracle import Twins, max_relative_difference
from ..testing.references import REFERENCES
from .models import MODELS, params_like

__all__ = ['PEERS', 'PEER', 'BENCH', 'QUICK_OPTIMIZERS', 'BenchCase', 'Row', 'implementations', 'adamw_builder', 'contenders', 'time_opts',
           'time_steps', 'cuda_costs', 'device_sync', 'max_difference', 'run_bench', 'REFERENCE', 'FASTAI_ADAM', 'ADAMW', 'torch_adamw',
           'torch_builder']


def _torch_sgd(impl, cls=torch.optim.SGD):
    def build(params, lr, mom, wd):
        return cls(params, lr, momentum=mom, weight_decay=wd, **{impl: True})
    return build


def torch_adamw(impl, cls=torch.optim.AdamW):
    def build(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01):
        return cls(params, lr, betas=(mom, sqr_mom), eps=eps, weight_decay=wd, **{impl: True})
    return build


# The torch face's classes take torch's keywords, `foreach=True` or `fused=True` among them.
def _face_sgd(impl): return _torch_sgd(impl, optim.SGD)
def _face_adamw(impl): return torch_adamw(impl, optim.AdamW)


@dataclass(frozen=True)
class BenchCase:
    """What the benchmark runs for one optimizer: its options, torch.optim's equal if it has one, and the
    torch face's class of the same update (`fastforeach.optim`, rows `optim_foreach` and `optim_fused`)."""
    options: dict
    torch_equal: Callable | None = None   # (impl) -> builder with the same options
    callbacks: Callable = list            # () -> the Learner callbacks it trains with
    face_equal: Callable | None = None    # (impl) -> builder of the torch face's optimizer, the same options

# SGD with momentum and L2 is exactly torch's SGD; fastai's Adam with decoupled wd is exactly AdamW.
BENCH: dict[str, BenchCase] = {
    'SGD': BenchCase({'mom': 0.9, 'wd': 0.01, 'decouple_wd': False}, _torch_sgd, face_equal=_face_sgd),
    'RMSProp': BenchCase({'mom': 0.9, 'wd': 0.01}),
    'Adam': BenchCase({}, torch_adamw, face_equal=_face_adamw),
    'RAdam': BenchCase({'wd': 0.01}),
    'QHAdam': BenchCase({'wd': 0.01}),
    'Larc': BenchCase({'wd': 0.01}),
    'Lamb': BenchCase({'wd': 0.01}),
    'ranger': BenchCase({}),
    'Lookahead': BenchCase({'mom': 0.9, 'wd': 0.01}),
    'Lion': BenchCase({}),
    'Adan': BenchCase({}),
    'StableAdam': BenchCase({}),
    'ScheduleFreeAdam': BenchCase({'wd': 0.01}, callbacks=lambda: [ScheduleFree()]),
    'Muon': BenchCase({'ns_dtype': torch.bfloat16}),  # as users run it (the registry's tests run float64)
    'Adafactor': BenchCase({'wd': 0.01}),
}
QUICK_OPTIMIZERS = ['SGD', 'Adam']

# The optimizers fastai lacks also step beside their published implementation, in its fastest mode on the
# device (`testing/references.py`), and beside fastai's Adam, for scale.
REFERENCE, FASTAI_ADAM = 'reference', 'fastai Adam'


def _optimi_peer(name):
    import optimi
    if name == 'SGD': return lambda params, lr: optimi.SGD(params, lr, momentum=0.9, weight_decay=0.01, foreach=True)
    return lambda params, lr: optimi.AdamW(params, lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, foreach=True)


class _GivesGradsBack:
    """An optimizer that frees the gradients in its step (heavyball's), given them back before each: the
    benchmark's gradients are fixed. (An attribute set per param, inside the step's time: microseconds.)"""
    def __init__(self, opt):
        self.opt, self.params = opt, [p for g in opt.param_groups for p in g['params']]
        self.grads = [p.grad for p in self.params]

    def step(self):
        for p, g in zip(self.params, self.grads): p.grad = g
        return self.opt.step()

    def __getattr__(self, name): return getattr(self.opt, name)


def _heavyball_peer(name):
    import heavyball
    if name == 'SGD': return lambda params, lr: _GivesGradsBack(heavyball.SGD(params, lr, beta=0.9, weight_decay=0.01))
    return lambda params, lr: _GivesGradsBack(heavyball.AdamW(params, lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01))


# Other libraries' optimizers of the kind the torch face offers, timed beside it where installed (`peer <package>`
# rows). Not the same math to the last detail (optimi's SGD dampens, heavyball warms its betas up): no
# difference column.
PEERS = {'optimi': _optimi_peer, 'heavyball': _heavyball_peer}
PEER = 'peer '


def implementations(name: str, peers: tuple = tuple(PEERS)) -> dict[str, Callable]:
    "Implementation name -> builder `(params, lr) -> optimizer` for the optimizer `name` (with `peers` of `PEERS` where installed)."
    spec, case = REGISTRY[name], BENCH[name]
    impls = {impl: _builder(spec, impl, case.options) for impl in IMPLEMENTATIONS}
    if case.torch_equal is not None:
        for impl in ('foreach', 'fused'):
            impls[f'torch_{impl}'] = torch_builder(case.torch_equal(impl), spec, case.options)
    if case.face_equal is not None:
        for impl in ('foreach', 'fused'):
            impls[f'optim_{impl}'] = torch_builder(case.face_equal(impl), spec, case.options)
        for package in peers:
            try: impls[PEER + package] = PEERS[package](name)
            except ImportError: pass
    if name in REFERENCES:
        build = REFERENCES[name].build
        impls[REFERENCE] = lambda params, lr: build([{'params': list(params), 'do_wd': True, 'fastai_group': 0}], lr,
                                                    True, **case.options)
        impls[FASTAI_ADAM] = lambda params, lr: native.Adam(params, lr)
    return impls

# Every fused optimizer is measured against torch's fused AdamW: it steps beside each optimizer, in the same
# rounds, so that the ratio does not span two runs and the machine's moods between them.
ADAMW = 'torch fused AdamW'


def adamw_builder() -> Callable:
    "torch's fused AdamW with fastai's Adam defaults (the Adam rows' torch_fused): the benchmark's yardstick."
    return implementations('Adam')['torch_fused']


def _builder(spec: OptimizerSpec, impl, options):
    return lambda params, lr: spec.make(impl, params, lr, **options)


def torch_builder(build, spec, options):
    defaults = {k: v.default for k, v in inspect.signature(spec.native).parameters.items() if k not in ('params', 'lr')}
    kwargs = {k: v for k, v in {**defaults, **options}.items() if k != 'decouple_wd'}
    return lambda params, lr: build(params, lr, **kwargs)


@dataclass
class Row:
    model: str
    optimizer: str
    impl: str
    ms: float
    speedup: float
    max_rel_diff: float | None
    n_tensors: int
    n_elements: int
    adamw_ms: float  # torch's fused AdamW on the same model, timed in the same interleaved rounds
    # On CUDA (None elsewhere): the median time until `step()` returns, before the device has finished (the
    # host's share: a step whose host_ms is near its ms is bound by Python and launches, not by memory);
    # the device operations (kernels, copies, fills) one step runs; and the most memory allocated while the
    # contender alone exists and steps: its params, gradients, state and temporaries.
    host_ms: float | None = None
    kernels: float | None = None
    peak_mb: float | None = None


def contenders(model: nn.Module, impls: dict[str, Callable], lr: float, device, shard: Callable = None) -> dict:
    """Each implementation's optimizer over its own copy of `model`'s params, with fixed gradients; `shard`,
    when given, turns each param and gradient into a DTensor (as FSDP2 would) before the optimizer sees it."""
    opts = {}
    for impl, build in impls.items():
        params = params_like(model, device)
        gen = torch.Generator(device).manual_seed(0)  # on the device: a large model's take seconds on the CPU
        grads = [torch.randn(p.shape, generator=gen, device=device) * 1e-3 for p in params]
        if shard is not None: params = [nn.Parameter(shard(p.detach())) for p in params]; grads = list(map(shard, grads))
        for p, g in zip(params, grads): p.grad = g
        opts[impl] = build(params, lr)
    return opts


def time_opts(opts: dict, steps: int, warmup: int, sync: Callable = lambda: None, host: dict | None = None) -> dict:
    """Median seconds per step of each optimizer, interleaved so that they share the machine's moods; `sync`
    before and after each step (CUDA: wait for the device; several ranks: a barrier). `host`, when given,
    receives each optimizer's median seconds until `step()` returned, before the closing `sync`."""
    times, returned = {impl: [] for impl in opts}, {impl: [] for impl in opts}
    # A new order every round: in a fixed one, each contender would always find the cache as the same
    # neighbour left it (measured: up to 7% on the MLP between two copies of one optimizer). Seeded, so
    # that every rank of a world steps the same optimizer at the same time.
    order, shuffle = list(opts.items()), random.Random(0).shuffle
    for i in range(warmup + steps):
        shuffle(order)
        for impl, opt in order:
            sync(); start = time.perf_counter()
            opt.step()
            back = time.perf_counter() - start
            sync(); elapsed = time.perf_counter() - start
            if i >= warmup: times[impl].append(elapsed); returned[impl].append(back)
    if host is not None: host.update({impl: statistics.median(t) for impl, t in returned.items()})
    return {impl: statistics.median(t) for impl, t in times.items()}


def device_sync(device) -> Callable:
    "What waits for `device` to finish its queued work: CUDA's synchronize, or nothing."
    return torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)


def time_steps(model: nn.Module, impls: dict[str, Callable], lr: float, steps: int, warmup: int, device,
               host: dict | None = None) -> dict:
    "Median seconds per step of each implementation on `model`'s params (see `contenders`, `time_opts`)."
    return time_opts(contenders(model, impls, lr, device), steps, warmup, device_sync(device), host)


def cuda_costs(model: nn.Module, build: Callable, lr: float, steps: int = 2) -> tuple[float, float]:
    """(peak MB, device operations per step) of one implementation on CUDA, alone: the most memory allocated
    while its params, gradients and optimizer exist and step `steps` times (from the allocator's own count),
    and the kernels, copies and fills its steps run (from the profiler, over `steps` steps after those)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (opt,) = contenders(model, {'one': build}, lr, 'cuda').values()
    for _ in range(steps): opt.step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps): opt.step()
        torch.cuda.synchronize()
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return peak_mb, len(on_device) / steps


def max_difference(model: nn.Module, impl_build: Callable, native_build: Callable, lr, steps, device) -> float:
    """Largest relative difference from fastai native after `steps` steps with fresh gradients: over params
    and state, or over params alone for torch.optim, whose state keys differ."""
    # One param group, handed over as a flat list, which torch.optim takes too.
    twins = Twins(lambda groups: native_build(groups[0], lr), lambda groups: impl_build(groups[0], lr),
                  [params_like(model, device)], mark_no_wd=False)
    for _ in range(steps): twins.step(lr, vary_mom=False)
    return max_relative_difference(twins)


def run_bench(models, optimizers, *, steps=7, warmup=3, check_steps=20, device='cpu', progress=True,
              peers: tuple = tuple(PEERS)) -> list[Row]:
    from fastprogress.fastprogress import progress_bar
    jobs = [(m, o) for m in models for o in optimizers]
    rows, built, on_cuda = [], {}, torch.device(device).type == 'cuda'
    for model_name, opt_name in (progress_bar(jobs) if progress else jobs):
        if model_name not in built: built = {model_name: MODELS[model_name]()}  # one model in memory at a time
        model, spec = built[model_name], REGISTRY[opt_name]
        impls, host = implementations(opt_name, peers), {}
        times = time_steps(model, {**impls, ADAMW: adamw_builder()}, spec.lr, steps, warmup, device, host)
        adamw_ms = times.pop(ADAMW) * 1e3
        n_tensors = sum(1 for _ in model.parameters())
        n_elements = sum(p.numel() for p in model.parameters())
        for impl, seconds in times.items():
            diff = 0. if impl == 'native' else None if impl == FASTAI_ADAM or impl.startswith(PEER) else max_difference(
                model, impls[impl], impls['native'], spec.lr, check_steps, device)
            peak_mb, kernels = cuda_costs(model, impls[impl], spec.lr) if on_cuda else (None, None)
            rows.append(Row(model_name, opt_name, impl, seconds * 1e3, times['native'] / seconds, diff,
                            n_tensors, n_elements, adamw_ms, host[impl] * 1e3 if on_cuda else None, kernels, peak_mb))
    return rows
