"""Small params stepped as one flat tensor (`Pack`), and how updates that need norms step one (`PackStep`)."""
from __future__ import annotations

import contextlib
import itertools
import operator
import weakref
from typing import Callable, NamedTuple

import torch

from ..distributed import LOCAL_NORMS, WholeNorms, root_mean_square
from ..ops import device_tensor
from .compile import CHUNK, coefficient_dtype
from .graphs import PackGraph
from .layout import alias_from, end_to_end, laid_end_to_end

__all__ = ['PACK_MAX_NUMEL', 'MULTI_TENSOR_DEVICES', 'pack_chunk', 'pack_max_numel', 'packs_as_on', 'Pack', 'PackStep']

# Params of at most this many elements, per device type, are stepped as one `Pack` by compiled updates.
# CPU: a compiled loop per tensor costs 5-7 µs below it (RAdam, 2 threads). CUDA: a kernel launch per tensor
# costs more than the arithmetic of all but the largest tensors, so the larger the packs the faster (H100,
# xresnet50 RMSProp, when packs copied their params in and out: 4.2 ms per step packing up to 8K elements,
# 1.7 ms up to 8M, which packs every param).
PACK_MAX_NUMEL = {'cpu': 1 << 13, 'cuda': 1 << 23}


# Device types where a pack's per-param norms and spreads are a few multi-tensor launches (`torch._foreach_norm`,
# a gather), its scratch buffer is kept, and an elementwise update steps it in a graph of its own (`pack_chunk`,
# not padded with `CHUNK - 1` one-element dummies, each a kernel launch): where each launch costs more than the
# arithmetic of most params (CUDA). On CPU, one reduction and one copy per run of params of the same size is
# faster, and the padded graph serves packs and chunks alike (one compile, not two).
MULTI_TENSOR_DEVICES = {'cuda'}


def _multi_tensor(t: torch.Tensor) -> bool: return t.device.type in MULTI_TENSOR_DEVICES


def pack_chunk(device: torch.device) -> int:
    "Tensors per call of the graph that steps a pack by an elementwise update (see `MULTI_TENSOR_DEVICES`)."
    return 1 if device.type in MULTI_TENSOR_DEVICES else CHUNK


def pack_max_numel(device: torch.device) -> int:
    "The largest param `device` steps in a `Pack` (other devices: as the CPU)."
    return PACK_MAX_NUMEL.get(device.type, PACK_MAX_NUMEL['cpu'])


@contextlib.contextmanager
def packs_as_on(device_type: str, like: str):
    "Within the block, `device_type` packs params as `like` does (`PACK_MAX_NUMEL`): the benchmark's 'CUDA packs' on CPU."
    saved = PACK_MAX_NUMEL[device_type]
    PACK_MAX_NUMEL[device_type] = PACK_MAX_NUMEL[like]
    try: yield
    finally: PACK_MAX_NUMEL[device_type] = saved


def _adoptable(params) -> bool:
    "Whether a pack may move `params` into its buffer: plain, contiguous leaf params (not DTensor shards, whose storage FSDP owns)."
    return all(isinstance(p, torch.nn.Parameter) and p.is_contiguous() for p in params)


class Pack:
    """Small params stepped as one flat tensor by a compiled update: every list the update steps (params,
    gradients, each state key, Kahan buffers) as one buffer, with the tensors themselves views of it.

    - State and Kahan buffers move into a buffer of their own when the pack is made, unless they lie end to
      end already; `moved[k]` holds the views to store in their place, or None where list k stayed.
    - Params (plain, contiguous `nn.Parameter`s: `adopted`) move into a buffer too: each param's data
      becomes a view of it (`p.data = view`), so the model's params are views of one buffer per pack and
      the update steps them where they are. Gradients follow at each step (`take_grads`): if they lie end
      to end they are stepped as they are, else they are copied into a buffer whose views become the
      params' `.grad`, so that the next backward accumulates into them (fastai zeroes gradients in place).
      A pack keeps no gradient buffer between steps.
    - Params that cannot be adopted (DTensor shards, channels-last or strided params) are copied into a
      buffer with their gradients and copied back (`give_back`) at every step, in buffers the pack keeps.

    16-bit params stepped in float32 are stepped in their own dtype by updates that work on float32 values
    inside the compiled loop (see `compile._runner`).

    On CUDA a pack's step is replayed from a graph once it has settled (`graph`: see `graphs.py`)."""
    __slots__ = ('params', 'adopted', 'flat_p', 'p_views', 'flat_g', 'g_views', 'flat_states', 'flat_comp', 'moved',
                 'graph', '_cached', '_grads', '_laid')

    def __init__(self, params, states, comps=None, adopt: bool = True):
        self.params, self.adopted = params, adopt and _adoptable(params)
        if self.adopted:
            self.flat_p, views = _moved(params)
            with torch.no_grad():
                for p, v in zip(params, views or ()): p.data = v
            self.p_views = self.flat_g = self.g_views = None
        else:
            self.flat_p, self.p_views = laid_end_to_end(params)
            self.flat_g, self.g_views = laid_end_to_end(params)
        self._grads, self._laid = self.g_views, None
        self.flat_states, self.moved = [], []
        for ss in [*states, *([comps] if comps else [])]:
            flat, views = _moved(ss)
            self.flat_states.append(flat)
            self.moved.append(views)
        self.flat_comp = self.flat_states.pop() if comps else None
        self._cached, self.graph = {}, PackGraph()

    @property
    def lists(self) -> list[list[torch.Tensor]]:
        "(params, grads, *states[, Kahan buffers]), each a list of one flat tensor, as compiled updates take them."
        comps = [[self.flat_comp]] if self.flat_comp is not None else []
        return [[self.flat_p], [self.flat_g], *([s] for s in self.flat_states), *comps]

    def take_grads(self, grads):
        "This step's gradients as `flat_g` (and, unless adopted, the params copied into `flat_p`)."
        if not self.adopted:
            torch._foreach_copy_(self.p_views, self.params)
            torch._foreach_copy_(self.g_views, grads)
            return
        if self._laid_as_before(grads):
            first = grads[self._laid[2]]
            self.flat_g, self._grads = alias_from(first, self.flat_p.numel()), grads
            return
        self.flat_g, views = _moved(grads)
        self._grads = grads if views is None else views
        # Views of another buffer (DDP's with gradient_as_bucket_view) stay the owner's: copied, not replaced.
        swapped = views is not None and all(g._base is None for g in grads)
        if swapped:
            for p, v in zip(self.params, views): p.grad = v
        laid = grads if views is None else views if swapped else None
        first = None if laid is None else next((i for i, g in enumerate(laid) if g.numel()), None)
        self._laid = None if first is None else (list(map(weakref.ref, laid)), list(map(torch.Tensor.data_ptr, laid)),
                                                 first)

    def _laid_as_before(self, grads) -> bool:
        """Whether `grads` are the tensors that lay end to end in the last step, at the same addresses: then they
        still do, and are not checked one by one again (fastai zeroes gradients in place; the check costs a
        few microseconds a tensor, more than the step on a slow host). The pack keeps them only weakly."""
        if self._laid is None or len(self._laid[0]) != len(grads): return False
        refs, ptrs, _ = self._laid
        return all(map(operator.is_, map(weakref.ref.__call__, refs), grads)) and list(map(torch.Tensor.data_ptr, grads)) == ptrs

    def give_back(self):
        "After the step: the params copied back where they are not the pack's; no gradient buffer kept."
        if self.adopted: self.flat_g = self._grads = None
        else: torch._foreach_copy_(self.params, self.p_views)

    def scratch(self) -> torch.Tensor:
        """A buffer like the pack's params that a phase may write (what is not the params' own): the pack's
        copy of the gradients when it copies them, else a buffer for this step, not kept on CPU; on CUDA
        kept, with its per-param views (see `_views`), since the caching allocator would hold its memory anyway
        (see `MULTI_TENSOR_DEVICES`)."""
        if not self.adopted: return self.flat_g
        if _multi_tensor(self.flat_p): return self._once('scratch', lambda: torch.empty_like(self.flat_p))
        return torch.empty_like(self.flat_p)

    def buffers(self) -> list:
        "Every tensor the pack holds: its flat params, gradients, state and buffers, and what it keeps for reuse."
        held = [self.flat_p, self.flat_g, *self.flat_states, self.flat_comp, *self._cached.values()]
        return [t for t in held if t is not None]

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
        tensor (see `_norms_of`); completed by `whole` to the norms of whole params where the pack holds shards
        of them (one all-reduce for all `flats`)."""
        return tuple(whole.complete(self._norms_of(*flats).to(coefficient_dtype(flats[0].dtype))))

    def rms(self, flat: torch.Tensor, whole: WholeNorms = LOCAL_NORMS) -> torch.Tensor:
        "The root mean square of each param's stretch of `flat`, of whole params as `norms`, as a 1-d tensor."
        norms = self._norms_of(flat)[0].to(coefficient_dtype(flat.dtype))
        numels = self._once(('numels', norms.dtype), lambda: device_tensor(self._numels, norms.dtype, norms.device))
        return root_mean_square(whole, norms, numels)

    @property
    def _numels(self) -> list[int]:
        "Each param's number of elements, in the pack's order."
        return self._once('sizes', lambda: [n for k, n in self._runs for _ in range(k)])

    def _segments(self, device) -> torch.Tensor:
        "Each element's param, as its index in the pack (int32)."
        index = torch.arange(len(self._numels), dtype=torch.int32, device=device)
        sizes = device_tensor(self._numels, torch.int64, device)
        return torch.repeat_interleave(index, sizes, output_size=self.flat_p.numel())

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each param's stretch of `flat`, one of the pack's flat tensors, as a tensor: the params or
        gradients themselves, or views of the kept scratch buffer made once (a `split` per step would cost
        a microsecond per param)."""
        if flat is self.flat_p: return self.params if self.adopted else self.p_views
        if flat is self.flat_g: return self._grads
        if flat is self._cached.get('scratch'): return self._once('scratch views', lambda: flat.split(self._numels))
        return list(flat.split(self._numels))

    def _norms_of(self, *flats: torch.Tensor) -> torch.Tensor:
        """The norm of each param's stretch of each of `flats`, one row per flat: one multi-tensor launch for
        all of them where `MULTI_TENSOR_DEVICES` says so, else one reduction per run of params of the same size."""
        if _multi_tensor(flats[0]):
            views = [v for flat in flats for v in self._views(flat)]
            return torch.stack(torch._foreach_norm(views)).view(len(flats), -1)
        def runs_of(flat):
            rows, at = [], 0
            for k, n in self._runs:
                rows.append(torch.linalg.vector_norm(flat[at:at + k * n].view(k, n), dim=1))
                at += k * n
            return torch.cat(rows) if len(rows) > 1 else rows[0]
        return torch.stack([runs_of(flat) for flat in flats])

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
        """One value per param written over each of its elements: a flat tensor the size of the pack. On CPU,
        one broadcast copy per run of equal sizes (read as `values[segments]` inside a compiled loop, an index
        per element kept inductor from vectorising it: 3x slower on the MLP); a pack that copies its params
        keeps the buffer for the next step, as it keeps its copies, one that steps them in place keeps
        nothing between steps. Where `MULTI_TENSOR_DEVICES` says so, one gather through each element's param
        index, made once and kept (int32): `repeat_interleave` would make that index at every call with one
        warp per param (H200, xresnet50's 25M elements: 1.8 ms, the gather 0.08 ms)."""
        if _multi_tensor(values):  # one gather over a kept index of each element's param (4 bytes an element)
            return values.index_select(0, self._once(('segments', values.device), lambda: self._segments(values.device)))
        def make(): return torch.empty(self.flat_p.numel(), dtype=values.dtype, device=values.device)
        out = make() if self.adopted else self._once('spread', make)
        at = first = 0
        for k, n in self._runs:
            out[at:at + k * n].view(k, n).copy_(values[first:first + k, None])
            at, first = at + k * n, first + k
        return out


def _moved(tensors) -> tuple[torch.Tensor, list | None]:
    "A flat alias over `tensors` and None when they lie end to end; else a new buffer holding them and its views."
    flat = end_to_end(tensors)
    if flat is not None and all(t.dtype == flat.dtype for t in tensors): return flat, None
    flat, views = laid_end_to_end(tensors)
    torch._foreach_copy_(views, tensors)
    return flat, views


class PackStep(NamedTuple):
    """How a `Pack` is stepped by an update that reduces over each tensor (Larc's and LAMB's norms), which
    the pack cannot do in one elementwise loop: `run(pack, c, l2, norms)` runs its compiled `phases` with
    `run_flat`, and the reductions between them with `Pack.norms(..., whole=norms)`; it returns one tuple of
    values to store per param, as the update would, or None. `l2` says whether `c` carries an L2 factor
    (not 0), so that a pass that only adds it can be skipped.

    Each phase is `(update, n_spread, writes)`: `update(*flat, *spread, c)` gets tensors of the pack's size
    and dtype (params, then gradients or a `scratch` buffer, then state), then its last `n_spread` tensors
    in `coefficient_dtype`: per-param values spread over their elements by `Pack.spread`; `writes` says
    whether it writes the params (for 16-bit params stepped in float32: see `compile._runner`). A phase
    must not write the gradients: they are the params' own. `CompiledStep.ready` compiles every phase on
    dummies before a step."""
    run: Callable
    phases: tuple[tuple[Callable, int, bool], ...]
