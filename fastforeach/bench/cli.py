"""`fastforeach-bench`: optimizer step time against fastai native, and equality on real models.

For each model x optimizer x implementation: the median step time over `--steps` interleaved steps after
warm-up, the speed-up against fastai native, the largest relative difference from fastai native after
`--check-steps` steps with fresh gradients, and the time over torch's fused AdamW's, which steps in the
same rounds (for Adam, beside its own torch_fused: two copies of one optimizer, a gauge of the noise).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from .experiments.compile_times import compile_times, format_compile_times
from .experiments.distributed import distributed_bench, format_distributed
from .experiments.memory import format_memory_floor, format_memory_table, memory_floor, memory_table
from .experiments.newton_schulz import format_newton_schulz_table, newton_schulz_table
from .experiments.release import format_release_table, release_table
from .experiments.training import accumulation_table, state_format_table, train_table
from .harness import BENCH, PEERS, QUICK_OPTIMIZERS, run_bench
from .models import MODELS, QUICK_MODELS
from .report import describe_machine, format_table, machine_info, plot, summary_table

__all__ = ['main']


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
    ap.add_argument('--state-formats', action='store_true',
                    help="also train an MLP on digits with Adam's averages in each low-bit state format (5 seeds)")
    ap.add_argument('--compile-times', nargs='*', metavar='OPT',
                    help='also time the first (compiling) fused step in fresh processes, cold and warm cache: of '
                         'the optimizers named, or of every one benchmarked when none is')
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
    if args.compile_times is not None: args.compile_times = _choose(args.compile_times, BENCH, optimizers, 'optimizer', ap)
    if args.threads < 1: ap.error(f"--threads must be >= 1, got {args.threads}")
    if min(args.steps, args.check_steps) < 1 or args.warmup < 0: ap.error("--steps and --check-steps must be >= 1")
    if args.device not in ('cpu', 'cuda'): ap.error(f"unknown device {args.device!r}; choose cpu or cuda")
    if args.device == 'cuda' and not torch.cuda.is_available(): ap.error("--device cuda: no CUDA device here")
    if args.distributed is not None and args.distributed < 2: ap.error(f"--distributed needs 2 ranks or more, got {args.distributed}")
    if args.quick: args.steps, args.warmup, args.check_steps = min(args.steps, 5), min(args.warmup, 2), min(args.check_steps, 5)
    command = ' '.join(['fastforeach-bench', *(sys.argv[1:] if argv is None else argv)])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try: return _run(args, models, optimizers, command)
    finally: torch.set_num_threads(threads)  # called from Python (a notebook, the tests): leave it as it was


def _run(args, models, optimizers, command) -> int:
    "Run what `args` asks for, print the report and write the files."
    # Quick mode leaves out the peers (heavyball compiles its steps with max-autotune: a minute on 2 cores).
    rows = run_bench(models, optimizers, steps=args.steps, warmup=args.warmup, check_steps=args.check_steps,
                     device=args.device, peers=() if args.quick else tuple(PEERS))
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
    if args.state_formats:
        result['state_formats'] = formats = state_format_table(device=args.device)
        report.append(formats['table'])
    if args.compile_times is not None:
        result['compile_times'] = compiled = compile_times(args.compile_times, threads=args.threads, device=args.device)
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
