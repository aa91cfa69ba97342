"""A pack's step captured once as a CUDA graph and replayed (`PackGraph`).

On CUDA a fused step is bound by the host, not the device: a compiled call costs a dynamo guard check and
a wrapper (0.1-0.5 ms of host time on an H200's host), and a pack stepped in phases (Larc, LAMB) adds a
dozen small launches around its norms, against a few microseconds of arithmetic on a small model. Replayed
as a graph, the whole pack step is one launch after one copy of its coefficients.

A graph replays the kernels on the tensors it was captured with, so it is captured only once a pack has
stepped the same way twice (`WARM_STEPS`: the pack made, its buffers and per-param views kept, its
gradients laid out) and is replayed only while the step's `key` says nothing changed: the gradients at the
same address (new gradients at an address of their own make the next steps eager until they settle), the
same phases (RAdam's choice), the same L2 flag. The coefficients, the only input that changes every step,
are copied into the graph's own vector first. Packs whose norms span ranks (an all-reduce), that copy their
params (DTensor shards) or round stochastically (a seed drawn each step) are not captured, nor is a step
taken while the caller captures a graph of its own (it captures ours). A capture that fails warns once and
leaves that pack eager.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

__all__ = ['GRAPH_DEVICES', 'WARM_STEPS', 'PackGraph', 'capture']

# Device types whose pack steps are captured as graphs: none by default until the graphs have been timed
# and checked on a GPU (`GRAPH_DEVICES.add('cuda')` turns them on; the CUDA tests run them).
GRAPH_DEVICES: set[str] = set()
# Eager steps, taken the same way, before a pack's step is captured.
WARM_STEPS = 2


def capture(step: Callable, c: torch.Tensor):
    """`(replay, outs)`: `step(c)` captured as a CUDA graph on a side stream (nothing runs yet), and what it
    returned, which each `replay()` rewrites in place."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device=c.device)
    stream.wait_stream(torch.cuda.current_stream(c.device))
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode='thread_local')  # other threads (a data loader's) carry on
        try: outs = step(c)
        finally: graph.capture_end()
    torch.cuda.current_stream(c.device).wait_stream(stream)
    return graph.replay, outs


class PackGraph:
    "The captured step of one pack, and how many times it stepped the same way (see the module docstring)."
    __slots__ = ('key', 'seen', 'replay', 'c', 'outs', 'failed')

    def __init__(self):
        self.key, self.seen, self.replay, self.c, self.outs, self.failed = None, 0, None, None, None, False

    def step(self, key: tuple, c: torch.Tensor, step: Callable):
        "`step(c)`, replayed from a graph while `key` is the one it was captured under."
        if self.failed or c.device.type not in GRAPH_DEVICES or (c.is_cuda and torch.cuda.is_current_stream_capturing()):
            return step(c)
        if key != self.key: self.key, self.seen, self.replay, self.c, self.outs = key, 0, None, None, None
        if self.replay is not None:
            self.c.copy_(c, non_blocking=True)
            self.replay()
            return self.outs
        self.seen += 1
        if self.seen <= WARM_STEPS: return step(c)
        static_c = c.clone()
        try: replay, outs = capture(step, static_c)
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured runs eagerly, as before
            self.failed = True
            warnings.warn(f"fastforeach: could not capture a fused step as a CUDA graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); stepping it eagerly", RuntimeWarning,
                          stacklevel=5)
            return step(c)
        self.replay, self.c, self.outs = replay, static_c, outs
        replay()
        return outs
