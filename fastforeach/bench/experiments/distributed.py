"""Each optimizer on FSDP2's layout, over gloo ranks, beside torch's AdamW on the same DTensors."""
from __future__ import annotations

from ...memory import state_bytes
from ...registry import REGISTRY
from ..models import MODELS
from ..harness import contenders, implementations, time_opts, torch_adamw, torch_builder

__all__ = ['distributed_bench', 'format_distributed']


TORCH_ADAMW = {'torch AdamW foreach': torch_adamw('foreach'), 'torch AdamW fused': torch_adamw('fused')}


def _fsdp2_rank(rank, world, models, optimizers, steps, warmup):
    "One rank of `distributed_bench`: its median step times and state bytes, and one process's state bytes."
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh('cpu', (world,))
    shard = lambda t: distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # as fully_shard lays params out
    adamw = {impl: torch_builder(build, REGISTRY['Adam'], {}) for impl, build in TORCH_ADAMW.items()}
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
    from ...testing.worlds import spawn
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
