"""`fastforeach-bench`: optimizer step time against fastai native, and equality on real models.

For each model x optimizer x implementation: the median step time over `--steps` interleaved steps after
warm-up, the speed-up against fastai native, the largest relative difference from fastai native after
`--check-steps` steps with fresh gradients, and the time over torch's fused AdamW's, which steps in the
same rounds (for Adam, beside its own torch_fused: two copies of one optimizer, a gauge of the noise).
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import fastai.optimizer as native
import torch
from torch import nn

from .oracle import Twins, max_relative_difference
from .optimizers.schedulefree import ScheduleFree
from .references import REFERENCES
from .registry import IMPLEMENTATIONS, REGISTRY, OptimizerSpec

__all__ = ['MODELS', 'BENCH', 'run_bench', 'memory_floor', 'distributed_bench', 'train_table', 'summary_table',
           'accumulation_table', 'release_table', 'newton_schulz_table', 'main']


def mlp(depth=100, width=64) -> nn.Module:
    "The 100-layer, 64-wide MLP: 200 small tensors."
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


def transformer() -> nn.Module:
    "A small transformer encoder: 4 layers, width 256."
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


def _xresnet(name):
    def build():
        from fastai.vision.models import xresnet
        return getattr(xresnet, name)()
    build.__doc__ = f"fastai's {name}"
    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    'xresnet18': _xresnet('xresnet18'), 'xresnet50': _xresnet('xresnet50'), 'transformer': transformer, 'mlp': mlp}
QUICK_MODELS, QUICK_OPTIMIZERS = ['mlp', 'xresnet18'], ['SGD', 'Adam']


def _torch_sgd(impl):
    def build(params, lr, mom, wd):
        return torch.optim.SGD(params, lr, momentum=mom, weight_decay=wd, **{impl: True})
    return build


def _torch_adamw(impl):
    def build(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01):
        return torch.optim.AdamW(params, lr, betas=(mom, sqr_mom), eps=eps, weight_decay=wd, **{impl: True})
    return build


@dataclass(frozen=True)
class BenchCase:
    "What the benchmark runs for one optimizer: its options and torch.optim's equal, if it has one."
    options: dict
    torch_equal: Callable | None = None   # (impl) -> builder with the same options
    callbacks: Callable = list            # () -> the Learner callbacks it trains with


# SGD with momentum and L2 is exactly torch's SGD; fastai's Adam with decoupled wd is exactly AdamW.
BENCH: dict[str, BenchCase] = {
    'SGD': BenchCase({'mom': 0.9, 'wd': 0.01, 'decouple_wd': False}, _torch_sgd),
    'RMSProp': BenchCase({'mom': 0.9, 'wd': 0.01}),
    'Adam': BenchCase({}, _torch_adamw),
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
}

# The optimizers fastai lacks also step beside their published implementation, in its fastest mode on the
# device (`references.py`), and beside fastai's Adam, for scale.
REFERENCE, FASTAI_ADAM = 'reference', 'fastai Adam'


def implementations(name: str) -> dict[str, Callable]:
    "Implementation name -> builder `(params, lr) -> optimizer` for the optimizer `name`."
    spec, case = REGISTRY[name], BENCH[name]
    impls = {impl: _builder(spec, impl, case.options) for impl in IMPLEMENTATIONS}
    if case.torch_equal is not None:
        for impl in ('foreach', 'fused'):
            impls[f'torch_{impl}'] = _torch_builder(case.torch_equal(impl), spec, case.options)
    if name in REFERENCES:
        build = REFERENCES[name].build
        impls[REFERENCE] = lambda params, lr: build([{'params': list(params), 'do_wd': True, 'fastai_group': 0}], lr,
                                                    True, **case.options)
        impls[FASTAI_ADAM] = lambda params, lr: native.Adam(params, lr)
    return impls


# Issue 5 measures every fused optimizer against torch's fused AdamW: it steps beside each optimizer, in the
# same rounds, so that the ratio does not span two runs and the machine's moods between them.
ADAMW = 'torch fused AdamW'


def adamw_builder() -> Callable:
    "torch's fused AdamW with fastai's Adam defaults (the Adam rows' torch_fused): the benchmark's yardstick."
    return implementations('Adam')['torch_fused']


def _builder(spec: OptimizerSpec, impl, options):
    return lambda params, lr: spec.make(impl, params, lr, **options)


def _torch_builder(build, spec, options):
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


def _params_like(model: nn.Module, device) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone().to(device)) for p in model.parameters()]


def contenders(model: nn.Module, impls: dict[str, Callable], lr: float, device, shard: Callable = None) -> dict:
    """Each implementation's optimizer over its own copy of `model`'s params, with fixed gradients; `shard`,
    when given, turns each param and gradient into a DTensor (as FSDP2 would) before the optimizer sees it."""
    opts = {}
    for impl, build in impls.items():
        params = _params_like(model, device)
        gen = torch.Generator().manual_seed(0)
        grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in params]
        if shard is not None: params = [nn.Parameter(shard(p.detach())) for p in params]; grads = list(map(shard, grads))
        for p, g in zip(params, grads): p.grad = g
        opts[impl] = build(params, lr)
    return opts


def time_opts(opts: dict, steps: int, warmup: int, sync: Callable = lambda: None) -> dict:
    """Median seconds per step of each optimizer, interleaved so that they share the machine's moods; `sync`
    before and after each step (CUDA: wait for the device; several ranks: a barrier)."""
    times = {impl: [] for impl in opts}
    # A new order every round: in a fixed one, each contender would always find the cache as the same
    # neighbour left it (measured: up to 7% on the MLP between two copies of one optimizer). Seeded, so
    # that every rank of a world steps the same optimizer at the same time.
    order, shuffle = list(opts.items()), random.Random(0).shuffle
    for i in range(warmup + steps):
        shuffle(order)
        for impl, opt in order:
            sync(); start = time.perf_counter()
            opt.step()
            sync(); elapsed = time.perf_counter() - start
            if i >= warmup: times[impl].append(elapsed)
    return {impl: statistics.median(t) for impl, t in times.items()}


def time_steps(model: nn.Module, impls: dict[str, Callable], lr: float, steps: int, warmup: int, device) -> dict:
    "Median seconds per step of each implementation on `model`'s params (see `contenders`, `time_opts`)."
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    return time_opts(contenders(model, impls, lr, device), steps, warmup, sync)


def max_difference(model: nn.Module, impl_build: Callable, native_build: Callable, lr, steps, device) -> float:
    """Largest relative difference from fastai native after `steps` steps with fresh gradients: over params
    and state, or over params alone for torch.optim, whose state keys differ."""
    # One param group, handed over as a flat list, which torch.optim takes too.
    twins = Twins(lambda groups: native_build(groups[0], lr), lambda groups: impl_build(groups[0], lr),
                  [_params_like(model, device)], mark_no_wd=False)
    for _ in range(steps): twins.step(lr, vary_mom=False)
    return max_relative_difference(twins)


def run_bench(models, optimizers, *, steps=7, warmup=3, check_steps=20, device='cpu', progress=True) -> list[Row]:
    from fastprogress.fastprogress import progress_bar
    jobs = [(m, o) for m in models for o in optimizers]
    rows, built = [], {}
    for model_name, opt_name in (progress_bar(jobs) if progress else jobs):
        if model_name not in built: built = {model_name: MODELS[model_name]()}  # one model in memory at a time
        model, spec = built[model_name], REGISTRY[opt_name]
        impls = implementations(opt_name)
        times = time_steps(model, {**impls, ADAMW: adamw_builder()}, spec.lr, steps, warmup, device)
        adamw_ms = times.pop(ADAMW) * 1e3
        n_tensors = sum(1 for _ in model.parameters())
        n_elements = sum(p.numel() for p in model.parameters())
        for impl, seconds in times.items():
            diff = 0. if impl == 'native' else None if impl == FASTAI_ADAM else max_difference(
                model, impls[impl], impls['native'], spec.lr, check_steps, device)
            rows.append(Row(model_name, opt_name, impl, seconds * 1e3, times['native'] / seconds, diff,
                            n_tensors, n_elements, adamw_ms))
    return rows


def format_table(rows: list[Row]) -> str:
    head = (f"{'model':<12} {'optimizer':<16} {'impl':<14} {'ms/step':>9} {'speed-up':>9} {'max rel diff':>13} "
            f"{'/ AdamW':>8}")
    lines = [head, '-' * len(head)]
    for r in rows:
        diff = '-' if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        lines.append(f"{r.model:<12} {r.optimizer:<16} {r.impl:<14} {r.ms:>9.2f} {r.speedup:>8.2f}x "
                     f"{diff:>13} {r.ms / r.adamw_ms:>7.2f}x")
    return '\n'.join(lines)


def reference_table(rows: list[dict]) -> str:
    """Markdown: per optimizer fastai lacks and model of `SUMMARY_MODELS`, the foreach and fused steps' times,
    its reference's (fastest mode) and fastai Adam's, and how many times faster fused is than the reference."""
    by = {(r['model'], r['optimizer'], r['impl']): r['ms'] for r in rows}
    lines = ['| optimizer | model | foreach ms | fused ms | reference ms | fused speed-up over reference | '
             'fastai Adam ms |', '|---|---|---:|---:|---:|---:|---:|']
    for name in (n for n in dict.fromkeys(r['optimizer'] for r in rows) if n in REFERENCES):
        for m, label in SUMMARY_MODELS.items():
            if (m, name, 'fused') not in by: continue
            fused, reference = by[(m, name, 'fused')], by[(m, name, REFERENCE)]
            lines.append(f"| {name} | {label} | {by[(m, name, 'foreach')]:.2f} | {fused:.2f} | {reference:.2f} "
                         f"| **{reference / fused:.2f}x** | {by[(m, name, FASTAI_ADAM)]:.2f} |")
    return '\n'.join(lines) + '\n'


_FIRST_STEPS = """
import time, torch
torch.set_num_threads({threads})
from fastforeach.bench import BENCH, MODELS, _params_like
from fastforeach.registry import REGISTRY
params = _params_like(MODELS[{model!r}](), {device!r})
for p in params: p.grad = torch.randn_like(p) * 1e-3
opt = REGISTRY[{name!r}].make('fused', params, **BENCH[{name!r}].options)
times = []
for _ in range(2):
    start = time.perf_counter(); opt.step(); times.append(time.perf_counter() - start)
print(*times)
"""


def compiled_optimizers(names) -> list[str]:
    "Those of `names` whose fused step is compiled (the others use kernels PyTorch ships)."
    from .fused import CompiledStep
    opts = {name: REGISTRY[name].make('fused', [nn.Parameter(torch.zeros(2))]) for name in names}
    return [name for name, opt in opts.items() if isinstance(getattr(opt, 'opt', opt).fused, CompiledStep)]


def compile_times(names, model='xresnet50', threads=2, device='cpu') -> list[dict]:
    """Seconds of the first fused step, which compiles, in a fresh process: cold (an empty inductor cache,
    as on a new machine) and warm (a new process finding what the cold one cached on disk); and the
    second step, compiled, for scale. Within one process the compiled graphs are reused by every model."""
    import os
    import subprocess
    import tempfile
    rows = []
    for name in compiled_optimizers(names):
        row = {'optimizer': name, 'model': model}
        with tempfile.TemporaryDirectory() as cache:
            for kind in ('cold', 'warm'):
                code = _FIRST_STEPS.format(threads=threads, model=model, device=device, name=name)
                out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                                     env={**os.environ, 'TORCHINDUCTOR_CACHE_DIR': cache})
                first, second = map(float, out.stdout.split()[-2:])
                row[f'{kind}_s'], row['step_ms'] = first, second * 1e3
        rows.append(row)
    return rows


def format_compile_times(rows: list[dict]) -> str:
    head = f"{'optimizer':<16} {'model':<10} {'cold first step':>16} {'warm first step':>16} {'then ms/step':>13}"
    return '\n'.join([head, '-' * len(head)] + [
        f"{r['optimizer']:<16} {r['model']:<10} {r['cold_s']:>15.1f}s {r['warm_s']:>15.1f}s {r['step_ms']:>13.1f}"
        for r in rows])


class _Pass:
    """A stand-in optimizer whose step is the cheapest pass over memory that reads `reads` lists of tensors
    shaped like the params (the params and `reads − 1` others) and writes the params back."""
    def __init__(self, params, reads: int):
        params = [p.detach() for p in params]
        others = [[torch.rand_like(p) * 1e-3 for p in params] for _ in range(reads - 1)]
        one = torch.ones((), dtype=params[0].dtype, device=params[0].device)
        ops = {1: lambda: torch._foreach_mul_(params, one), 2: lambda: torch._foreach_add_(params, *others),
               3: lambda: torch._foreach_addcmul_(params, *others)}
        self.step = ops[reads]


_PASSES = {f'pass reading {k}': k for k in (1, 2, 3)}


def memory_floor(model: str, threads: int = 2, device='cpu', steps=15, warmup=3) -> list[dict]:
    """What one pass over `model`'s params costs on this machine, beside SGD's steps (the benchmark's options):
    a pass that reads k param-sized lists and writes one back (k = 1, 2, 3), fastai's SGD, fastforeach's fused
    SGD and torch's. An SGD step with momentum must read three lists (params, gradients, momentum): no
    one-pass SGD is faster than the pass reading 3, so fastai's time over it bounds any fused SGD's speed-up."""
    torch.set_num_threads(threads)
    sgd = implementations('SGD')
    impls = {name: (lambda params, lr, k=k: _Pass(params, k)) for name, k in _PASSES.items()}
    impls.update({'fastai SGD': sgd['native'], 'fused SGD': sgd['fused'], 'torch fused SGD': sgd['torch_fused']})
    times = time_steps(MODELS[model](), impls, REGISTRY['SGD'].lr, steps, warmup, device)
    reads = {**_PASSES, 'fused SGD': 3, 'torch fused SGD': 3}  # fastai's SGD reads in several passes
    return [{'model': model, 'what': name, 'reads': reads.get(name), 'ms': seconds * 1e3,
             'fastai_over_this': times['fastai SGD'] / seconds} for name, seconds in times.items()]


# What `--memory` counts, per model: (label, optimizer, param dtype, options, pack threshold on this device).
# Adam's fused step is PyTorch's kernel in float32 (no packs); RAdam's is compiled, and packs small params.
_BF16 = torch.bfloat16
MEMORY_SETUPS = [
    ('fastai native', 'Adam', torch.float32, {'foreach': False}, None),
    ('foreach', 'Adam', torch.float32, {}, None),
    ('fused', 'Adam', torch.float32, {'fused': True}, None),
    ('torch fused AdamW', 'AdamW', torch.float32, {}, None),
    ('fused', 'RAdam', torch.float32, {'fused': True}, None),
    ('fused, CUDA packs', 'RAdam', torch.float32, {'fused': True}, 'cuda'),
    ('foreach, Kahan', 'Adam', _BF16, {}, None),
    ('fused, Kahan', 'Adam', _BF16, {'fused': True}, None),
    ('fused, Kahan bf16', 'Adam', _BF16, {'fused': True, 'kahan_dtype': _BF16}, None),
    ('fused, stochastic', 'Adam', _BF16, {'fused': True, 'rounding': 'stochastic'}, None),
    ('fused, Kahan', 'RAdam', _BF16, {'fused': True}, None),
    ('fused, Kahan, CUDA packs', 'RAdam', _BF16, {'fused': True}, 'cuda'),
]


class _WithThreshold:
    "An optimizer stepped with another device's pack threshold (`fused.PACK_MAX_NUMEL`) in force."
    def __init__(self, opt, device: str, threshold: str):
        self.opt, self.device, self.threshold = opt, device, threshold

    def step(self):
        from .fused import PACK_MAX_NUMEL
        saved = dict(PACK_MAX_NUMEL)
        PACK_MAX_NUMEL[self.device] = PACK_MAX_NUMEL[self.threshold]
        try: self.opt.step()
        finally: PACK_MAX_NUMEL.update(saved)


def memory_table(model: str, device='cpu', steps=5, warmup=2) -> list[dict]:
    """Bytes per param element each setup holds after its warm-up steps (`memory.memory_report`): params,
    gradients, optimizer state and fastforeach's own buffers, the last also as a share of the param bytes;
    and its step time, the setups interleaved as in `time_opts`. 'CUDA packs' steps with CUDA's pack
    threshold (`fused.PACK_MAX_NUMEL`), which packs far more params."""
    import fastforeach

    from .memory import memory_report
    net, setups = MODELS[model](), {}
    for label, name, dtype, options, threshold in MEMORY_SETUPS:
        params = [nn.Parameter(p.to(dtype)) for p in _params_like(net, device)]
        gen = torch.Generator().manual_seed(0)
        for p in params: p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        opt = (torch.optim.AdamW(params, 1e-3, fused=True) if name == 'AdamW' else
               getattr(fastforeach, name)(params, REGISTRY[name].lr, **options))
        if threshold: opt = _WithThreshold(opt, torch.device(device).type, threshold)
        setups[f"{name} {str(dtype).split('.')[-1]} {label}"] = (params, opt)
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    times = time_opts({k: opt for k, (_, opt) in setups.items()}, steps, warmup, sync)
    rows = []
    for setup, (params, opt) in setups.items():
        report = memory_report(params, getattr(opt, 'opt', opt) if isinstance(opt, _WithThreshold) else opt)
        rows.append({'model': model, 'setup': setup, **report['per_param'],
                     'extra_share': report['fastforeach'] / report['params'], 'ms': times[setup] * 1e3})
    return rows


def format_memory_table(rows: list[dict]) -> str:
    head = (f"{'model':<12} {'setup':<38} {'params':>7} {'grads':>6} {'state':>6} {'buffers':>8} {'total':>6} "
            f"{'buffers / params':>17} {'ms/step':>8}")
    return '\n'.join(['bytes per param element, and step time', head, '-' * len(head)] + [
        f"{r['model']:<12} {r['setup']:<38} {r['params']:>7.2f} {r['grads']:>6.2f} {r['state']:>6.2f} "
        f"{r['fastforeach']:>8.2f} {r['total']:>6.2f} {r['extra_share']:>16.1%} {r['ms']:>8.2f}" for r in rows])


def example_input(model: str, device='cpu') -> torch.Tensor:
    "A small batch each benchmark model takes."
    gen = torch.Generator().manual_seed(0)
    shape = {'mlp': (8, 64), 'transformer': (2, 16, 256)}.get(model, (2, 3, 64, 64))
    return torch.randn(shape, generator=gen).to(device)


def release_table(model: str, device='cpu', steps=5, warmup=2, optimizer='Adam') -> list[dict]:
    """Gradient release against a normal step (fused `optimizer`, the same forward and backward passes):
    the most bytes of gradients alive at once during backward, and the optimizer's time per step (summed
    over the buckets stepped in backward's hooks, with release)."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    import fastforeach

    from .memory import PeakGradBytes
    from .release import GradientRelease
    rows = []
    for release in (False, True):
        torch.manual_seed(0)
        net = MODELS[model]().to(device)
        x = example_input(model, device)
        learn = Learner(DataLoaders(device=device), net, loss_func=lambda *_: 0,
                        opt_func=lambda ps, lr: getattr(fastforeach, optimizer)(ps, REGISTRY[optimizer].lr, fused=True))
        learn.create_opt()
        cb = GradientRelease() if release else None
        if cb: learn.add_cb(cb); cb.before_fit()
        learn.training, tracker, times = True, PeakGradBytes(net.parameters()), []
        sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
        for i in range(warmup + steps):
            loss = net(x).float().pow(2).mean()
            if cb: cb.before_backward()
            loss.backward()
            if cb:
                cb.after_backward()
                seconds = cb.step_seconds
            else:
                sync(); start = time.perf_counter()
                learn.opt.step()
                sync(); seconds = time.perf_counter() - start
                learn.opt.zero_grad()
            if i >= warmup: times.append(seconds)
        if cb: cb.after_fit()
        tracker.remove()
        grads = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        rows.append({'model': model, 'optimizer': optimizer, 'release': release, 'peak_grad_bytes': tracker.peak,
                     'peak_share': tracker.peak / grads, 'step_ms': statistics.median(times) * 1e3})
    return rows


def format_release_table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'optimizer':<10} {'release':<8} {'peak grad MB':>13} {'of all grads':>13} {'step ms':>8} {'/ normal':>9}"
    normal = {r['model']: r['step_ms'] for r in rows if not r['release']}
    return '\n'.join(['gradient release: gradients alive during backward, and optimizer time per step', head,
                      '-' * len(head)] + [
        f"{r['model']:<12} {r['optimizer']:<10} {str(r['release']):<8} {r['peak_grad_bytes'] / 2**20:>13.2f} "
        f"{r['peak_share']:>12.1%} {r['step_ms']:>8.2f} {r['step_ms'] / normal[r['model']]:>8.2f}x" for r in rows])


def newton_schulz_table(model='xresnet50', device='cpu', steps=5, warmup=1, batches=4) -> list[dict]:
    """Muon's orthogonalisation of every kernel Muon's default route picks in `model`, alone: time (median of
    `steps`, interleaved) of torch's Newton-Schulz (as `torch.optim.Muon` runs it), fastforeach's standard
    iteration and its Gram iteration, all in bf16, and each one's relative error against the iteration in
    float64, on gradients summed over `batches` batches of 16 random images with random labels (BatchNorm
    weights set to 1, so that every kernel has a gradient)."""
    import torch.optim._muon as torch_muon

    from .optimizers.muon import NS_COEFFICIENTS, default_route, orthogonalize, orthogonalize_one
    torch.manual_seed(0)
    net = MODELS[model]().to(device)
    for m in net.modules():  # zero-initialised BatchNorm would leave the kernels before it no gradient
        if isinstance(m, nn.modules.batchnorm._BatchNorm): nn.init.ones_(m.weight)
    route = default_route([list(net.parameters())])
    for _ in range(batches):
        out = net(torch.randn((16, *example_input(model).shape[1:]), device=device))
        nn.functional.cross_entropy(out, torch.randint(out.shape[-1], out.shape[:1], device=device)).backward()
    matrices = [p.grad.reshape(p.shape[0], -1) for p in net.parameters() if route(p)]
    methods = {"torch's": lambda: [torch_muon._zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in matrices],
               'standard': lambda: orthogonalize(matrices, 5, torch.bfloat16, 'standard'),
               'gram': lambda: orthogonalize(matrices, 5, torch.bfloat16, 'gram')}
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    times = {k: [] for k in methods}
    for i in range(warmup + steps):
        for k, run in methods.items():
            sync(); start = time.perf_counter(); run(); sync()
            if i >= warmup: times[k].append(time.perf_counter() - start)
    exact = [orthogonalize_one(m.double(), 5, torch.float64, 'standard') for m in matrices]
    rows = []
    for k, run in methods.items():
        errors = [((o.double() - e).norm() / e.norm()).item() for o, e in zip(run(), exact)]
        rows.append({'model': model, 'method': k, 'kernels': len(matrices), 'ms': statistics.median(times[k]) * 1e3,
                     'median_error': statistics.median(errors), 'max_error': max(errors)})
    return rows


def format_newton_schulz_table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'Newton-Schulz':<14} {'kernels':>8} {'ms':>8} {'error median':>13} {'error max':>10}"
    return '\n'.join(["Muon's orthogonalisation in bf16 of every kernel it steps (relative error against float64)",
                      head, '-' * len(head)] + [
        f"{r['model']:<12} {r['method']:<14} {r['kernels']:>8} {r['ms']:>8.2f} {r['median_error']:>12.2%} "
        f"{r['max_error']:>9.2%}" for r in rows])


TRAINED = ('SGD', 'Adam', 'RAdam', 'Lion', 'Adan', 'StableAdam', 'ScheduleFreeAdam', 'Muon')


def train_table(epochs=5, device='cpu', optimizers=TRAINED) -> dict:
    """`fit_one_cycle` on digits with each implementation and the benchmark's options, discriminative lrs up to
    10x the optimizer's registry lr: seconds per epoch, final accuracy and loss."""
    from fastai.callback.progress import ProgressCallback

    from .training import digits_learner
    rows = []
    for name in optimizers:
        spec, options = REGISTRY[name], BENCH[name].options
        for impl in IMPLEMENTATIONS:
            learn = digits_learner(lambda ps, lr, spec=spec, impl=impl: spec.make(impl, ps, lr, **options), device=device,
                                   n_train=1280, cbs=BENCH[name].callbacks())
            learn.remove_cb(ProgressCallback)
            with learn.no_logging():
                start = time.perf_counter()
                learn.fit_one_cycle(epochs, lr_max=slice(spec.lr, 10 * spec.lr))
                seconds = (time.perf_counter() - start) / epochs
                loss, acc = learn.validate()
            rows.append({'optimizer': name, 'impl': impl, 's_per_epoch': seconds, 'accuracy': float(acc),
                         'loss': float(loss)})
    head = f"{'optimizer':<16} {'impl':<10} {'s/epoch':>8} {'accuracy':>9} {'valid loss':>11}"
    lines = [head, '-' * len(head)] + [
        f"{r['optimizer']:<16} {r['impl']:<10} {r['s_per_epoch']:>8.3f} {r['accuracy']:>9.4f} {r['loss']:>11.4f}"
        for r in rows]
    return {'rows': rows, 'table': '\n'.join(lines)}


def accumulation_table(optimizers=('Adam', 'RAdam', 'Lamb', 'ranger'), seeds=(0, 1, 2), epochs=10, n_acc=4, bs=64,
                       lr=3e-2, device='cpu') -> dict:
    """Optimizer accumulation against fastai's GradientAccumulation over the same effective batch (`n_acc`
    micro-batches of `bs`): `fit_one_cycle` on digits, accuracy on 512 validation images, per seed and mean."""
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.training import GradientAccumulation

    from .release import OptimizerAccumulation
    from .training import digits_learner
    setups = {'GradientAccumulation': lambda: GradientAccumulation(n_acc * bs),
              'OptimizerAccumulation': lambda: OptimizerAccumulation(n_acc)}
    rows = []
    for name in optimizers:
        spec = REGISTRY[name]
        for setup, make_cb in setups.items():
            accs = []
            for seed in seeds:
                learn = digits_learner(lambda ps, lr, spec=spec: spec.make('foreach', ps, lr), seed=seed, device=device,
                                       n_train=1280, n_valid=512, bs=bs, cbs=make_cb())
                learn.remove_cb(ProgressCallback)
                with learn.no_logging():
                    learn.fit_one_cycle(epochs, lr)
                    accs.append(float(learn.validate()[1]))
            rows.append({'optimizer': name, 'setup': setup, 'accuracies': accs, 'accuracy': statistics.mean(accs)})
    head = f"{'optimizer':<10} {'setup':<22} {'accuracy (mean)':>16} {'per seed':>26}"
    lines = [f"{n_acc} micro-batches of {bs}, fit_one_cycle({epochs}, {lr:g}) on digits", head, '-' * len(head)] + [
        f"{r['optimizer']:<10} {r['setup']:<22} {r['accuracy']:>16.4f} {' '.join(f'{a:.4f}' for a in r['accuracies']):>26}"
        for r in rows]
    return {'rows': rows, 'table': '\n'.join(lines)}


def format_memory_floor(rows: list[dict]) -> str:
    head = f"{'model':<12} {'what':<18} {'lists read':>10} {'ms':>8} {'fastai SGD / this':>18}"
    return '\n'.join([head, '-' * len(head)] + [
        f"{r['model']:<12} {r['what']:<18} {r['reads'] or '':>10} {r['ms']:>8.2f} {r['fastai_over_this']:>17.2f}x"
        for r in rows])


# --- under FSDP2 ------------------------------------------------------------------------------------

TORCH_ADAMW = {'torch AdamW foreach': _torch_adamw('foreach'), 'torch AdamW fused': _torch_adamw('fused')}


def state_bytes(opt) -> int:
    """Bytes of the tensors in `opt`'s state dict (this rank's shards of DTensors), each storage counted once:
    what the optimizer holds beyond params and gradients."""
    from .distributed import local
    seen, stack = {}, [opt.state_dict()]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = local(x).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict): stack += x.values()
        elif isinstance(x, (list, tuple)): stack += x
    return sum(seen.values())


def _fsdp2_rank(rank, world, models, optimizers, steps, warmup):
    "One rank of `distributed_bench`: its median step times and state bytes, and one process's state bytes."
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh('cpu', (world,))
    shard = lambda t: distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # as fully_shard lays params out
    adamw = {impl: _torch_builder(build, REGISTRY['Adam'], {}) for impl, build in TORCH_ADAMW.items()}
    rows = []
    for model_name in models:
        model = MODELS[model_name]()
        for name in optimizers:
            spec, impls = REGISTRY[name], implementations(name)
            builders = {'foreach': impls['foreach'], 'fused': impls['fused'], **adamw}
            sharded = contenders(model, builders, spec.lr, 'cpu', shard)
            times = time_opts(sharded, steps, warmup, dist.barrier)
            whole = contenders(model, builders, spec.lr, 'cpu')
            for opt in whole.values(): opt.step()
            rows += [{'model': model_name, 'optimizer': name, 'impl': impl, 'ms': times[impl] * 1e3,
                      'state_bytes': state_bytes(opt), 'one_process_state_bytes': state_bytes(whole[impl])}
                     for impl, opt in sharded.items()]
    return rows


def distributed_bench(models, optimizers, *, world_size=2, threads=1, steps=7, warmup=3) -> list[dict]:
    """Each optimizer's step on FSDP2's layout (every param and gradient a DTensor sharded on dim 0 over
    `world_size` gloo ranks, `threads` torch threads each) beside torch's AdamW, foreach and fused, on the
    same DTensors in the same rounds: the slowest rank's median step time, and the state bytes each rank
    holds (the most of any rank) against what one process holds."""
    from .worlds import spawn
    ranks = spawn(_fsdp2_rank, models, optimizers, steps, warmup, world_size=world_size, threads=threads)
    rows = ranks[0]
    for i, row in enumerate(rows):
        row['ms'] = max(r[i]['ms'] for r in ranks)
        row['state_bytes'] = max(r[i]['state_bytes'] for r in ranks)
    return rows


def format_distributed(rows: list[dict], world_size: int) -> str:
    head = (f"{'model':<12} {'optimizer':<10} {'impl':<20} {'ms/step':>8} {'/ AdamW fused':>14} "
            f"{'state MB/rank':>14} {'one process MB':>15} {'ratio':>6}")
    yardstick = {(r['model'], r['optimizer']): r['ms'] for r in rows if r['impl'] == 'torch AdamW fused'}
    lines = [f"FSDP2 layout: {world_size} gloo ranks; each optimizer timed beside torch's AdamW in the same rounds",
             head, '-' * len(head)]
    for r in rows:
        one = r['one_process_state_bytes']
        lines.append(f"{r['model']:<12} {r['optimizer']:<10} {r['impl']:<20} {r['ms']:>8.2f} "
                     f"{r['ms'] / yardstick[r['model'], r['optimizer']]:>13.2f}x {r['state_bytes'] / 2**20:>14.2f} "
                     f"{one / 2**20:>15.2f} {r['state_bytes'] / one if one else float('nan'):>6.2f}")
    return '\n'.join(lines)


def machine_info(threads: int, device: str, command: str = '') -> dict:
    import fastai
    return {'command': command, 'machine': platform.machine(), 'processor': _cpu_name(),
            'python': platform.python_version(), 'torch': torch.__version__, 'fastai': fastai.__version__,
            'threads': threads, 'device': device,
            'cuda': torch.cuda.get_device_name() if torch.device(device).type == 'cuda' else None}


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.platform()


def describe_machine(info: dict) -> str:
    "One line: the device, CPU, threads and versions a result was measured with."
    device = info['cuda'] or f"{info['processor']} ({info['machine']})"
    return (f"{device}, {info['threads']} torch threads, torch {info['torch']}, fastai {info['fastai']}, "
            f"Python {info['python']}")


# The rows of the README's table: every optimizer, on a model of large tensors and one of many small ones.
SUMMARY_MODELS = {'xresnet50': 'xresnet50', 'mlp': 'MLP'}


def summary_table(result: dict) -> str:
    """Markdown: per optimizer, the foreach and fused speed-ups over fastai native and the fused step's time
    over torch's fused AdamW's, on the models of `SUMMARY_MODELS` that `result` has; the command and
    machine below it."""
    rows = {(r['model'], r['optimizer'], r['impl']): r for r in result['rows']}
    models = [m for m in SUMMARY_MODELS if any(key[0] == m for key in rows)]
    optimizers = [o for o in dict.fromkeys(r['optimizer'] for r in result['rows']) if REGISTRY[o].in_fastai]
    head = ['optimizer'] + [f"{SUMMARY_MODELS[m]}: {what}" for m in models
                            for what in ('foreach', 'fused', 'fused / torch AdamW')]
    lines = ['| ' + ' | '.join(head) + ' |', '|---' + '|---:' * (len(head) - 1) + '|']
    for opt in optimizers:
        cells = [opt]
        for m in models:
            foreach, fused = rows.get((m, opt, 'foreach')), rows.get((m, opt, 'fused'))
            cells += [f"{foreach['speedup']:.2f}x" if foreach else '', f"**{fused['speedup']:.2f}x**" if fused else '',
                      f"{fused['ms'] / fused['adamw_ms']:.2f}" if fused else '']
        lines.append('| ' + ' | '.join(cells) + ' |')
    info = result['info']
    modern = [r for r in result['rows'] if r['optimizer'] in REFERENCES]
    more = ['', 'The optimizers fastai lacks, beside their published implementation in its fastest mode on the device '
            '(optimi foreach, schedulefree foreach, torch\'s Muon with AdamW) and fastai\'s Adam:', '',
            reference_table(modern).rstrip('\n')] \
        if modern else []
    return '\n'.join(lines + more + ['', f"`{info['command']}` on {describe_machine(info)}."]) + '\n'


def plot(rows: list[Row], path: str) -> None:
    "A PNG bar chart of the speed-ups against fastai native, one panel per model."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in rows if REGISTRY[r.optimizer].in_fastai]  # against fastai's own native optimizers
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r.model == model]
        optimizers = list(dict.fromkeys(r.optimizer for r in mine))
        impls = list(dict.fromkeys(r.impl for r in mine))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs = [j + i * width for j, o in enumerate(optimizers) if any(r.optimizer == o and r.impl == impl for r in mine)]
            ys = [r.speedup for o in optimizers for r in mine if r.optimizer == o and r.impl == impl]
            ax.bar(xs, ys, width, label=impl)
        ax.axhline(1, color='grey', lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(optimizers))], optimizers)
        ax.set_ylabel('speed-up vs fastai')
        ax.set_title(model)
        ax.legend(fontsize='small', ncol=len(impls))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='fastforeach-bench', description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', metavar='MODEL', help=f"any of {', '.join(MODELS)} (default: all)")
    ap.add_argument('--optimizers', nargs='+', metavar='OPT', help=f"any of {', '.join(BENCH)} (default: all)")
    ap.add_argument('--quick', action='store_true', help='a subset that runs in under a minute on 2 CPU cores')
    ap.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default cpu)")
    ap.add_argument('--steps', type=int, default=7, help='timed steps per contender (default 7)')
    ap.add_argument('--warmup', type=int, default=3, help='untimed steps first (default 3)')
    ap.add_argument('--check-steps', type=int, default=20, help='steps before the correctness check (default 20)')
    ap.add_argument('--json', metavar='PATH', help='write the results as JSON')
    ap.add_argument('--plot', metavar='PATH', help='write a PNG chart of the speed-ups')
    ap.add_argument('--out', metavar='PREFIX',
                    help='write PREFIX.json, PREFIX.png, PREFIX.txt (what is printed) and PREFIX.md (the summary table)')
    ap.add_argument('--train', action='store_true', help='also train a small CNN on digits with each implementation, and optimizer accumulation against GradientAccumulation')
    ap.add_argument('--compile-times', action='store_true',
                    help='also time the first (compiling) fused step in fresh processes, cold and warm cache')
    ap.add_argument('--memory', action='store_true',
                    help="also count the bytes per param each setup holds (fp32, pure bf16), and time plain passes "
                         "over each model's params beside SGD: the floor of a one-pass step")
    ap.add_argument('--distributed', type=int, nargs='?', const=2, metavar='RANKS',
                    help="also step each optimizer on FSDP2's layout over RANKS gloo processes (default 2) beside "
                         "torch's AdamW on the same DTensors: step time and optimizer state bytes per rank")
    return ap


def _choose(given, known, quick, what, ap):
    chosen = given or (quick if quick is not None else list(known))
    unknown = [c for c in chosen if c not in known]
    if unknown: ap.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    models = _choose(args.models, MODELS, QUICK_MODELS if args.quick else None, 'model', ap)
    optimizers = _choose(args.optimizers, BENCH, QUICK_OPTIMIZERS if args.quick else None, 'optimizer', ap)
    if args.threads < 1: ap.error(f"--threads must be >= 1, got {args.threads}")
    if min(args.steps, args.check_steps) < 1 or args.warmup < 0: ap.error("--steps and --check-steps must be >= 1")
    if args.device not in ('cpu', 'cuda'): ap.error(f"unknown device {args.device!r}; choose cpu or cuda")
    if args.device == 'cuda' and not torch.cuda.is_available(): ap.error("--device cuda: no CUDA device here")
    if args.distributed is not None and args.distributed < 2: ap.error(f"--distributed needs 2 ranks or more, got {args.distributed}")
    if args.quick: args.steps, args.warmup, args.check_steps = min(args.steps, 5), min(args.warmup, 2), min(args.check_steps, 5)
    torch.set_num_threads(args.threads)
    command = ' '.join(['fastforeach-bench', *(sys.argv[1:] if argv is None else argv)])
    rows = run_bench(models, optimizers, steps=args.steps, warmup=args.warmup, check_steps=args.check_steps,
                     device=args.device)
    result = {'info': machine_info(args.threads, args.device, command), 'steps': args.steps, 'warmup': args.warmup,
              'check_steps': args.check_steps, 'rows': [asdict(r) for r in rows]}
    report = [f"# {command}\n# {describe_machine(result['info'])}", format_table(rows)]
    if 'Muon' in optimizers and 'xresnet50' in models:
        result['newton_schulz'] = ns = newton_schulz_table(device=args.device)
        report.append(format_newton_schulz_table(ns))
    if args.train:
        result['train'] = train = train_table(device=args.device)
        result['accumulation'] = accumulated = accumulation_table(device=args.device)
        report += [train['table'], accumulated['table']]
    if args.compile_times:
        result['compile_times'] = compiled = compile_times(optimizers, threads=args.threads, device=args.device)
        report.append(format_compile_times(compiled))
    if args.memory:
        result['memory'] = floor = [r for m in models for r in memory_floor(m, args.threads, args.device, args.steps,
                                                                            args.warmup)]
        report.append(format_memory_floor(floor))
        result['bytes'] = held = [r for m in models for r in memory_table(m, args.device, args.steps, args.warmup)]
        report.append(format_memory_table(held))
        result['release'] = released = [r for m in models for r in release_table(m, args.device, args.steps, args.warmup)]
        report.append(format_release_table(released))
    if args.distributed:
        result['distributed'] = dist_rows = distributed_bench(
            models, optimizers, world_size=args.distributed, threads=max(1, args.threads // args.distributed),
            steps=args.steps, warmup=args.warmup)
        report.append(format_distributed(dist_rows, args.distributed))
    text = '\n\n'.join(report) + '\n'
    print(text, end='')
    outputs = {'json': args.json, 'png': args.plot}
    if args.out: outputs.update({k: f"{args.out}.{k}" for k in ('json', 'png', 'txt', 'md')})
    if outputs['json']:
        with open(outputs['json'], 'w') as f: json.dump(result, f, indent=2)
    if outputs['png']: plot(rows, outputs['png'])
    if outputs.get('txt'):
        with open(outputs['txt'], 'w') as f: f.write(text)
    if outputs.get('md'):
        with open(outputs['md'], 'w') as f: f.write(summary_table(result))
    return 0

if __name__ == '__main__':
    sys.exit(main())
