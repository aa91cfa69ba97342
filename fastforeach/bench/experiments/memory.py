"""What each setup holds in memory per param, and what one pass over a model's params costs: the floor of a
one-pass step."""
from __future__ import annotations

import torch
from torch import nn

from ...fused import foreach_for_16bit, packs_as_on
from ...memory import memory_report
from ...registry import REGISTRY
from ..harness import device_sync, implementations, time_opts, time_steps
from ..models import MODELS, params_like

__all__ = ['memory_floor', 'format_memory_floor', 'MEMORY_SETUPS', 'memory_table', 'format_memory_table']


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


def format_memory_floor(rows: list[dict]) -> str:
    head = f"{'model':<12} {'what':<18} {'lists read':>10} {'ms':>8} {'fastai SGD / this':>18}"
    return '\n'.join([head, '-' * len(head)] + [
        f"{r['model']:<12} {r['what']:<18} {r['reads'] or '':>10} {r['ms']:>8.2f} {r['fastai_over_this']:>17.2f}x"
        for r in rows])

# What `--memory` counts, per model: (label, optimizer, param dtype, options, pack threshold on this device, or
# `FOREACH_RULE`: 16-bit params stepped by the foreach rule, not its fused form).
# Adam's fused step is PyTorch's kernel in float32 (no packs); RAdam's is compiled, and packs small params.
_BF16 = torch.bfloat16
FOREACH_RULE = 'foreach rule'
MEMORY_SETUPS = [
    ('fastai native', 'Adam', torch.float32, {'foreach': False}, None),
    ('foreach', 'Adam', torch.float32, {}, None),
    ('fused', 'Adam', torch.float32, {'fused': True}, None),
    ('torch fused AdamW', 'AdamW', torch.float32, {}, None),
    ('fused', 'RAdam', torch.float32, {'fused': True}, None),
    ('fused, CUDA packs', 'RAdam', torch.float32, {'fused': True}, 'cuda'),
    ('foreach, Kahan', 'Adam', _BF16, {}, None),
    ('foreach rule, Kahan', 'Adam', _BF16, {}, FOREACH_RULE),
    ('fused, Kahan', 'Adam', _BF16, {'fused': True}, None),
    ('fused, Kahan bf16', 'Adam', _BF16, {'fused': True, 'kahan_dtype': _BF16}, None),
    ('fused, stochastic', 'Adam', _BF16, {'fused': True, 'rounding': 'stochastic'}, None),
    ('foreach rule, 24-bit masters', 'Adam', _BF16, {'rounding': 'master24'}, FOREACH_RULE),
    ('fused, 24-bit masters', 'Adam', _BF16, {'fused': True, 'rounding': 'master24'}, None),
    ('fused, Kahan', 'RAdam', _BF16, {'fused': True}, None),
    ('fused, Kahan, CUDA packs', 'RAdam', _BF16, {'fused': True}, 'cuda'),
    ('8-bit state', 'Adam', torch.float32, {'state_format': '8bit'}, None),
    ('fused, 8-bit state', 'Adam', torch.float32, {'fused': True, 'state_format': '8bit'}, None),
    ('fused, 8-bit companded state', 'Adam', torch.float32, {'fused': True, 'state_format': '8bit-companded'}, None),
    ('4-bit state', 'Adam', torch.float32, {'state_format': '4bit'}, None),
    ('fused, stochastic, 8-bit state', 'Adam', _BF16, {'fused': True, 'rounding': 'stochastic', 'state_format': '8bit'}, None),
    ('fused, stochastic, 8-bit companded', 'Adam', _BF16,
     {'fused': True, 'rounding': 'stochastic', 'state_format': '8bit-companded'}, None),
    ('fused, 24-bit masters, 8-bit state', 'Adam', _BF16, {'fused': True, 'rounding': 'master24', 'state_format': '8bit'},
     None),
    ('fused, 24-bit masters, 8-bit companded', 'Adam', _BF16,
     {'fused': True, 'rounding': 'master24', 'state_format': '8bit-companded'}, None),
    ('fused, 24-bit masters, 4/8-bit state', 'Adam', _BF16,
     {'fused': True, 'rounding': 'master24', 'state_format': {'grad_avg': '4bit', 'sqr_avg': '8bit'}}, None),
    ('bitsandbytes', 'AdamW8bit', torch.float32, {}, None),
    ('torchao', 'AdamW8bit', torch.float32, {}, None),
    ('torchao', 'AdamW4bit', torch.float32, {}, None),
]


def _peer(name: str, label: str):
    """torch's fused AdamW, or bitsandbytes' or torchao's low-bit AdamW (`label` names the package), with fastai's
    Adam defaults (betas 0.9, 0.99, eps 1e-5, decoupled wd 0.01): a builder `(params) -> optimizer`, or None
    where the package does not import."""
    defaults = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    try:
        if name == 'AdamW': return lambda params: torch.optim.AdamW(params, **defaults, fused=True)
        if label == 'bitsandbytes':
            import bitsandbytes as bnb
            return lambda params: getattr(bnb.optim, name)(params, **defaults)
        import torchao.optim as ao
        return lambda params: getattr(ao, name)(params, **defaults)
    except ImportError: return None


class _WithThreshold:
    """An optimizer stepped with another device's pack threshold (see `fused.packs_as_on`), or with its 16-bit
    params by its foreach rule (`threshold` `FOREACH_RULE`: see `fused.foreach_for_16bit`)."""
    def __init__(self, opt, device: str, threshold: str):
        self.opt, self.device, self.threshold = opt, device, threshold

    def step(self):
        with foreach_for_16bit() if self.threshold == FOREACH_RULE else packs_as_on(self.device, self.threshold):
            self.opt.step()


def memory_table(model: str, device='cpu', steps=5, warmup=2) -> list[dict]:
    """Bytes per param element each setup holds after its warm-up steps (`memory.memory_report`): params,
    gradients, optimizer state and fastforeach's own buffers, the last also as a share of the param bytes;
    and its step time, the setups interleaved as in `time_opts`. 'CUDA packs' steps with CUDA's pack
    threshold (`fused.PACK_MAX_NUMEL`), which packs far more params; 'foreach rule' steps 16-bit params by
    the foreach rule (by default a foreach optimizer steps them by the rule's fused form)."""
    import fastforeach
    net, setups = MODELS[model](), {}
    for label, name, dtype, options, threshold in MEMORY_SETUPS:
        peer = None if hasattr(fastforeach, name) else _peer(name, label)
        if peer is None and not hasattr(fastforeach, name): continue  # a peer that is not installed
        params = [nn.Parameter(p.to(dtype)) for p in params_like(net, device)]
        gen = torch.Generator().manual_seed(0)
        for p in params: p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        opt = peer(params) if peer else getattr(fastforeach, name)(params, REGISTRY[name].lr, **options)
        if threshold: opt = _WithThreshold(opt, torch.device(device).type, threshold)
        setups[f"{name} {str(dtype).split('.')[-1]} {label}"] = (params, opt)
    times = time_opts({k: opt for k, (_, opt) in setups.items()}, steps, warmup, device_sync(device))
    rows = []
    for setup, (params, opt) in setups.items():
        report = memory_report(params, opt.opt if isinstance(opt, _WithThreshold) else opt)
        rows.append({'model': model, 'setup': setup, **report['per_param'],
                     'extra_share': report['fastforeach'] / report['params'], 'ms': times[setup] * 1e3})
    return rows


def format_memory_table(rows: list[dict]) -> str:
    head = (f"{'model':<12} {'setup':<44} {'params':>7} {'grads':>6} {'state':>6} {'buffers':>8} {'total':>6} "
            f"{'buffers / params':>17} {'ms/step':>8}")
    return '\n'.join(['bytes per param element, and step time', head, '-' * len(head)] + [
        f"{r['model']:<12} {r['setup']:<44} {r['params']:>7.2f} {r['grads']:>6.2f} {r['state']:>6.2f} "
        f"{r['fastforeach']:>8.2f} {r['total']:>6.2f} {r['extra_share']:>16.1%} {r['ms']:>8.2f}" for r in rows])
