"""Real training on digits: each implementation's accuracy and time, and optimizer accumulation against
fastai's GradientAccumulation."""
from __future__ import annotations

import statistics
import time

from ...lowbit import StateFormat
from ...registry import IMPLEMENTATIONS, REGISTRY
from ..harness import BENCH

__all__ = ['TRAINED', 'STATE_FORMATS', 'train_table', 'accumulation_table', 'state_format_table']


TRAINED = ('SGD', 'Adam', 'RAdam', 'Lion', 'Adan', 'StableAdam', 'ScheduleFreeAdam', 'Muon')


def train_table(epochs=5, device='cpu', optimizers=TRAINED) -> dict:
    """`fit_one_cycle` on digits with each implementation and the benchmark's options, discriminative lrs up to
    10x the optimizer's registry lr: seconds per epoch, final accuracy and loss."""
    from fastai.callback.progress import ProgressCallback

    from ...testing.training import digits_learner
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

    from ...callbacks import OptimizerAccumulation
    from ...testing.training import digits_learner
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


# The setups `state_format_table` trains: (label, param dtype, Adam's keywords).
STATE_FORMATS = [
    ('float32', 'float32', {}),
    ('8-bit, stochastic', 'float32', {'state_format': '8bit'}),
    ('8-bit, nearest', 'float32', {'state_format': StateFormat('8bit', rounding='nearest')}),
    ('4-bit, stochastic', 'float32', {'state_format': '4bit'}),
    ('4-bit, nearest', 'float32', {'state_format': StateFormat('4bit', rounding='nearest')}),
    ('8-bit companded, stochastic', 'float32', {'state_format': '8bit-companded'}),
    ('8-bit companded, nearest', 'float32', {'state_format': StateFormat('8bit-companded', rounding='nearest')}),
    ('pure bf16 (Kahan)', 'bfloat16', {}),
    ('pure bf16 (Kahan), 8-bit, stochastic', 'bfloat16', {'state_format': '8bit'}),
    ('pure bf16 (Kahan), 4-bit, stochastic', 'bfloat16', {'state_format': '4bit'}),
    ('pure bf16 (Kahan), 8-bit companded', 'bfloat16', {'state_format': '8bit-companded'}),
    ('pure bf16, 24-bit masters', 'bfloat16', {'rounding': 'master24'}),
    ('pure bf16, 24-bit masters, 8-bit', 'bfloat16', {'rounding': 'master24', 'state_format': '8bit'}),
    ('pure bf16, 24-bit masters, 8-bit companded', 'bfloat16', {'rounding': 'master24', 'state_format': '8bit-companded'}),
    ('pure bf16, 24-bit masters, 4/8-bit', 'bfloat16',
     {'rounding': 'master24', 'state_format': {'grad_avg': '4bit', 'sqr_avg': '8bit'}}),
]


def state_format_table(seeds=(0, 1, 2, 3, 4), epochs=5, lr=3e-3, device='cpu', setups=STATE_FORMATS) -> dict:
    """Adam with its averages in each format (`lowbit.py`), float32 and pure bf16 params: `fit_one_cycle` on
    digits with `digits_mlp` (every matrix of 4,096 elements or more), accuracy on 512 validation images per
    seed, their mean and standard deviation."""
    import fastforeach
    from fastai.callback.progress import ProgressCallback

    from ...testing.training import digits_learner
    rows = []
    for label, dtype, options in setups:
        accs = []
        for seed in seeds:
            learn = digits_learner(lambda ps, lr, options=options: fastforeach.Adam(ps, lr, **options), seed=seed,
                                   device=device, n_train=1280, n_valid=512, mlp=True)
            learn.remove_cb(ProgressCallback)
            if dtype == 'bfloat16': learn.to_pure_bf16()
            with learn.no_logging():
                learn.fit_one_cycle(epochs, lr)
                accs.append(float(learn.validate()[1]))
        rows.append({'setup': label, 'accuracies': accs, 'accuracy': statistics.mean(accs),
                     'std': statistics.stdev(accs) if len(accs) > 1 else 0.})
    head = f"{'Adam, averages in':<38} {'accuracy (mean)':>16} {'std':>7} {'per seed':>36}"
    lines = [f"fit_one_cycle({epochs}, {lr:g}) on digits, an MLP of matrices of 4,096 elements or more", head,
             '-' * len(head)] + [
        f"{r['setup']:<38} {r['accuracy']:>16.4f} {r['std']:>7.4f} {' '.join(f'{a:.4f}' for a in r['accuracies']):>36}"
        for r in rows]
    return {'rows': rows, 'table': '\n'.join(lines)}
