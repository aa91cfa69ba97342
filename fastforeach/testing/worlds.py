"""Small process worlds on one machine, for the distributed tests and `fastforeach-bench --distributed`.

`spawn(fn, *args, world_size=2)` starts `world_size` fresh processes, each in a gloo process group (one
torch thread each unless told otherwise), runs `fn(rank, world_size, *args)` in each and returns what each
returned, in rank order. A failure in any rank is raised in the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch

__all__ = ['spawn']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, threads, fn, args):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({'ok': result}, Path(out_dir) / f'{rank}.pt')
        # Every rank done before any leaves: a rank that tears down while a peer still finishes a
        # collective can abort either process.
        dist.barrier()
    except BaseException:
        torch.save({'error': traceback.format_exc()}, Path(out_dir) / f'{rank}.pt')
        raise
    # Leave without tearing down: the results are saved, and gloo's threads and what accelerate registers
    # at exit have been seen to abort a process on its way out ("terminate called without an active
    # exception").
    os._exit(0)


def spawn(fn: Callable, *args, world_size: int = 2, threads: int = 1) -> list:
    "Run `fn(rank, world_size, *args)` in `world_size` new processes joined in a gloo group; their results."
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_rank_main, args=(world_size, _free_port(), out_dir, threads, fn, args), nprocs=world_size)
        except Exception as e:
            errors = [torch.load(f, weights_only=False).get('error') for f in sorted(Path(out_dir).glob('*.pt'))]
            raise RuntimeError('\n'.join(['a rank failed:', *filter(None, errors)]) if any(errors) else str(e)) from e
        return [torch.load(Path(out_dir) / f'{r}.pt', weights_only=False)['ok'] for r in range(world_size)]
