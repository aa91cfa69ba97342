"""Small params stepped as one flat tensor (`Pack`), and how updates that need norms step one (`PackStep`)."""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

import torch

from ..distributed import LOCAL_NORMS, WholeNorms
from ..precision import stochastic_round
from .compile import coefficient_dtype
from .layout import end_to_end, laid_end_to_end

__all__ = ['PACK_MAX_NUMEL', 'pack_max_numel', 'Pack', 'PackStep']

# Params of at most this many elements, per device type, are stepped as one `Pack` by compiled updates.
# CPU: a compiled loop per tensor costs 5-7 µs below it, copying in and out 3-6 µs (RAdam, 2 threads; about
# even at 16K elements). CUDA: a kernel launch per tensor costs more than copying all but the largest in
# and out, so the larger the packs the faster (H100, xresnet50 RMSProp: 4.2 ms per step packing up to 8K
# elements, 2.2 ms up to 1M, 1.7 ms up to 8M, which packs every param). A pack holds a copy of its params
# and gradients, so larger tensors, which gain little, are stepped one by one.
PACK_MAX_NUMEL = {'cpu': 1 << 13, 'cuda': 1 << 23}


def pack_max_numel(device: torch.device) -> int:
    "The largest param `device` steps in a `Pack` (other devices: as the CPU)."
    return PACK_MAX_NUMEL.get(device.type, PACK_MAX_NUMEL['cpu'])


class Pack:
    """Small params stepped as one flat tensor by a compiled update.

    Their state lives end to end for good, each state tensor a view of one buffer per key; each step copies
    the params and this step's gradients into buffers of their own (`copy_in`) and the params back
    (`copy_out`), so the pack holds while params and state do, whatever becomes of the gradients. State
    not laid out so (new, loaded from a state dict, replaced by hand) is moved into a new buffer when the
    pack is made: `moved[k]` holds the views to store in its place, or None where state key k stayed.

    16-bit params stepped in float32 (`rounding`, see `precision.py`) are copied in as float32 working
    values, with their Kahan buffers (`comps`, which live end to end like state, moved last) added, and
    written back from them in `copy_out`; their state stays in their own dtype."""
    __slots__ = ('params', 'flat_p', 'p_views', 'flat_g', 'g_views', 'flat_states', 'flat_comp', 'moved', 'rounding',
                 '_cached')

    def __init__(self, params, states, comps=None, rounding: str | None = None):
        self.params, self.rounding = params, rounding
        dtype = params[0].dtype
        work = torch.float32 if rounding else dtype
        self.flat_p, self.p_views = laid_end_to_end(params, work)
        self.flat_g, self.g_views = laid_end_to_end(params, work)
        self.flat_states, self.moved = [], []
        for ss, want in [*((ss, dtype) for ss in states), *([(comps, comps[0].dtype)] if comps else [])]:
            flat, views = end_to_end(ss), None
            if flat is None or flat.dtype != want or flat.device != self.flat_p.device:
                flat, views = laid_end_to_end(params, want)
                torch._foreach_copy_(views, ss)
            self.flat_states.append(flat)
            self.moved.append(views)
        self.flat_comp = self.flat_states.pop() if comps else None
        self._cached = {}

    @property
    def lists(self) -> list[list[torch.Tensor]]:
        "(params, grads, *states), each a list of one flat tensor, as compiled updates take them."
        return [[self.flat_p], [self.flat_g], *([s] for s in self.flat_states)]

    def copy_in(self, grads):
        torch._foreach_copy_(self.p_views, self.params)
        if self.flat_comp is not None: self.flat_p.add_(self.flat_comp)
        torch._foreach_copy_(self.g_views, grads)

    def copy_out(self):
        if not self.rounding: return torch._foreach_copy_(self.params, self.p_views)
        rounded, views = self._once('rounded', lambda: laid_end_to_end(self.params))
        if self.flat_comp is not None:
            rounded.copy_(self.flat_p)
            torch.sub(self.flat_p, rounded, out=self.flat_comp)
        else: rounded.copy_(stochastic_round(self.flat_p, rounded.dtype, torch.rand_like(self.flat_p)))
        torch._foreach_copy_(self.params, views)

    def buffers(self) -> list:
        "Every tensor the pack holds: its flat params, gradients, state and buffers, and what it keeps for reuse."
        return [self.flat_p, self.flat_g, *self.flat_states, *([self.flat_comp] if self.flat_comp is not None else []),
                *self._cached.values()]

    def _once(self, key, make):
        if key not in self._cached: self._cached[key] = make()
        return self._cached[key]

    @property
    def _runs(self) -> list[tuple[int, int]]:
        "(how many, elements each) of every run of params of the same size, in order (see `Plans.pack`)."
        return self._once('runs', lambda: [(len(list(run)), n) for n, run in
                                           itertools.groupby(p.numel() for p in self.params)])

    def norms(self, *flats: torch.Tensor, whole: WholeNorms = LOCAL_NORMS) -> tuple[torch.Tensor, ...]:
        """For each of `flats` (the pack's params, gradients…), the L2 norm of each param's stretch as a 1-d
        tensor: one reduction per run of params of the same size, not one per param; completed by `whole`
        to the norms of whole params where the pack holds shards of them (one all-reduce for all `flats`)."""
        def of(flat):
            rows, at = [], 0
            for k, n in self._runs:
                rows.append(torch.linalg.vector_norm(flat[at:at + k * n].view(k, n), dim=1))
                at += k * n
            return torch.cat(rows) if len(rows) > 1 else rows[0]
        local = torch.stack([of(flat) for flat in flats]).to(coefficient_dtype(flats[0].dtype))
        return tuple(whole.complete(local))

    def per_param(self, key: str, values: torch.Tensor) -> list[torch.Tensor]:
        """`values` (1-d, one per param) as one 0-d tensor per param, to store in the state: views of a buffer
        the pack keeps under `key`, the same tensors every step, each step's values written into them.
        (Unbinding anew makes a tensor per param per step: 0.1 ms a step on a 200-param pack.)"""
        def buffer_and_views():
            buffer = torch.empty_like(values)
            return buffer, buffer.unbind()
        buffer, views = self._once(('per_param', key), buffer_and_views)
        buffer.copy_(values)
        return views

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """One value per param written over each of its elements: a flat tensor the size of the pack, one
        broadcast copy per run of equal sizes. (Read as `values[segments]` inside a compiled loop, an index
        per element kept inductor from vectorising it: 3x slower on the MLP.) Its buffer is reused by the
        next call."""
        out = self._once('spread', lambda: torch.empty(self.flat_p.numel(), dtype=values.dtype, device=values.device))
        at = first = 0
        for k, n in self._runs:
            out[at:at + k * n].view(k, n).copy_(values[first:first + k, None])
            at, first = at + k * n, first + k
        return out


class PackStep(NamedTuple):
    """How a `Pack` is stepped by an update that reduces over each tensor (Larc's and LAMB's norms), which
    the pack cannot do in one elementwise loop: `run(pack, c, l2, norms)` runs its compiled `phases` with
    `run_flat`, and the reductions between them with `Pack.norms(..., whole=norms)`; it returns one tuple of
    values to store per param, as the update would, or None. `l2` says whether `c` carries an L2 factor
    (`c[1]`, else 0), so that a pass that only adds it can be skipped.

    Each phase is `(update, n_spread)`: `update(*flat, *spread, c)` gets tensors of the pack's size and
    dtype, then its last `n_spread` tensors in `coefficient_dtype`: per-param values spread over their
    elements by `Pack.spread`. `CompiledStep.ready` compiles every phase on dummies before a step."""
    run: Callable
    phases: tuple[tuple[Callable, int], ...]
