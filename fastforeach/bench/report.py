"""The benchmark's output: tables, the README's summary, the chart, and the machine a result was measured on."""
from __future__ import annotations

import platform

import torch

from ..registry import REGISTRY
from ..testing.references import REFERENCES
from .harness import FASTAI_ADAM, PEER, PEERS, REFERENCE, Row

__all__ = ['format_table', 'reference_table', 'torch_face_table', 'summary_table', 'SUMMARY_MODELS', 'machine_info', 'describe_machine', 'plot']


def format_table(rows: list[Row]) -> str:
    "The step times; on CUDA also the host's share, the device operations per step and the peak memory."
    cuda = any(r.host_ms is not None for r in rows)
    head = (f"{'model':<12} {'optimizer':<16} {'impl':<14} {'ms/step':>9} {'speed-up':>9} {'max rel diff':>13} "
            f"{'/ AdamW':>8}" + (f" {'host ms':>8} {'kernels':>8} {'peak MB':>8}" if cuda else ''))
    lines = [head, '-' * len(head)]
    for r in rows:
        diff = '-' if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        lines.append(f"{r.model:<12} {r.optimizer:<16} {r.impl:<14} {r.ms:>9.2f} {r.speedup:>8.2f}x "
                     f"{diff:>13} {r.ms / r.adamw_ms:>7.2f}x"
                     + (f" {r.host_ms:>8.2f} {r.kernels:>8.0f} {r.peak_mb:>8.0f}" if cuda else ''))
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


def torch_face_table(rows: list[dict]) -> str:
    """Markdown: per optimizer with a torch-face class and model of `SUMMARY_MODELS`, the step times of torch's
    own foreach and fused optimizer, of `fastforeach.optim`'s foreach and fused, and of the peers installed."""
    by = {(r['model'], r['optimizer'], r['impl']): r['ms'] for r in rows}
    peers = [p for p in PEERS if any(key[2] == PEER + p for key in by)]
    lines = ['| optimizer | model | torch foreach ms | torch fused ms | fastforeach.optim foreach ms | '
             'fastforeach.optim fused ms |' + ''.join(f' {p} ms |' for p in peers), '|---|---' + '|---:' * (4 + len(peers)) + '|']
    for name in dict.fromkeys(r['optimizer'] for r in rows):
        for m, label in SUMMARY_MODELS.items():
            if (m, name, 'optim_fused') not in by: continue
            cells = [by.get((m, name, impl)) for impl in ('torch_foreach', 'torch_fused', 'optim_foreach', 'optim_fused')]
            cells += [by.get((m, name, PEER + p)) for p in peers]
            lines.append(f"| {'AdamW' if name == 'Adam' else name} | {label} | " +
                         ' | '.join('' if c is None else f"{c:.2f}" for c in cells) + ' |')
    return '\n'.join(lines) + '\n'


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
            '(optimi foreach, schedulefree foreach, torch\'s Muon with AdamW, torch\'s Adafactor) and fastai\'s Adam:', '',
            reference_table(modern).rstrip('\n')] \
        if modern else []
    if any(r['impl'] == 'optim_fused' for r in result['rows']):
        more += ['', 'The torch face (`fastforeach.optim`, fastai\'s defaults) beside torch\'s own optimizers and other '
                 'libraries\' (same hypers; their math differs in details), ms a step:', '',
                 torch_face_table(result['rows']).rstrip('\n')]
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
