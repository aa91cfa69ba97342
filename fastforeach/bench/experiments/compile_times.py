"""The first fused step, which compiles, timed in fresh processes: cold and warm compile cache."""
from __future__ import annotations

import sys

from ...testing.cases import compiled_optimizers

__all__ = ['compiled_optimizers', 'compile_times', 'format_compile_times', 'TARGETS_S']

# What a notebook user should wait for the first fused step of a new model on CPU, in seconds: the
# table says which rows meet them (see docs/how-it-works.md, "What the first fused step costs").
TARGETS_S = {'cold': 5.0, 'warm': 1.0}


_FIRST_STEPS = """
import time, torch
torch.set_num_threads({threads})
from fastforeach.bench import BENCH, MODELS, params_like
from fastforeach.bench.harness import device_sync
from fastforeach.registry import REGISTRY
params = params_like(MODELS[{model!r}](), {device!r})
for p in params: p.grad = torch.randn_like(p) * 1e-3
opt = REGISTRY[{name!r}].make('fused', params, **BENCH[{name!r}].options, **{options!r})
sync = device_sync({device!r})
sync()
times = []
for _ in range(2):
    start = time.perf_counter(); opt.step(); sync(); times.append(time.perf_counter() - start)
print(*times)
"""


def compile_times(names, model='xresnet50', threads=2, device='cpu', state_format: str | None = None) -> list[dict]:
    """Seconds of the first fused step, which compiles, in a fresh process: cold (an empty inductor cache,
    as on a new machine) and warm (a new process finding what the cold one cached on disk); and the
    second step, compiled, for scale. Within one process the compiled graphs are reused by every model.
    With `state_format` (a format's name), each of `names` keeps its averages in it: its fused step
    compiles the few-bit loop (see `fused/coded.py`), whether or not its float32 step is compiled."""
    import os
    import subprocess
    import tempfile
    rows = []
    options = {'state_format': state_format} if state_format else {}
    for name in (names if state_format else compiled_optimizers(names)):
        row = {'optimizer': f"{name} {state_format}" if state_format else name, 'model': model}
        with tempfile.TemporaryDirectory() as cache:
            for kind in ('cold', 'warm'):
                code = _FIRST_STEPS.format(threads=threads, model=model, device=device, name=name, options=options)
                out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                                     env={**os.environ, 'TORCHINDUCTOR_CACHE_DIR': cache})
                first, second = map(float, out.stdout.split()[-2:])
                row[f'{kind}_s'], row['step_ms'] = first, second * 1e3
        rows.append(row)
    return rows


def format_compile_times(rows: list[dict]) -> str:
    head = f"{'optimizer':<20} {'model':<10} {'cold first step':>16} {'warm first step':>16} {'then ms/step':>13}"
    lines = [head, '-' * len(head)] + [
        f"{r['optimizer']:<20} {r['model']:<10} {r['cold_s']:>15.1f}s {r['warm_s']:>15.1f}s {r['step_ms']:>13.1f}"
        for r in rows]
    met = {kind: sum(r[f'{kind}_s'] <= target for r in rows) for kind, target in TARGETS_S.items()}
    lines.append(f"{'target':<31} {TARGETS_S['cold']:>15.1f}s {TARGETS_S['warm']:>15.1f}s"
                 f"   (met by {met['cold']} and {met['warm']} of {len(rows)})")
    return '\n'.join(lines)
