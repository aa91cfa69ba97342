"""Params sharded as DTensors (FSDP2's `fully_shard`, tensor parallelism): stepped on their local shards.

Under FSDP2 every param, gradient and state tensor is a `DTensor`: each rank holds one shard of it. An
elementwise update gives the same result shard by shard as on the whole tensor, so the engine hands
its rules and fused steps the *local* shards, plain tensors on which every foreach op, kernel and
compiled update applies (dispatching through DTensor measured 2x slower, and most fused ops have no
sharding rule at all). The state stays a DTensor, sharded like its param, so checkpoints see the layout.

What is not elementwise is a norm of a whole param (Larc's and LAMB's trust ratios): a rule asks for a
`norms` argument (see `rules.StepRule`) and gets a `WholeNorms`, which computes the norms of the local
shards and completes them with one all-reduce per call, over every list and param it is given.

State in few bits (`lowbit.py`) is sharded with params whose shards are runs of their flat order (Shard(0),
FSDP2's): the codes like the param, the blocks' scales whole on every rank, the blocks that two shards
share scaled by their largest value over both (`complete_max`).

Only `Shard` and `Replicate` placements are supported: a param whose gradient is laid out otherwise
(a `Partial` sum still to be reduced) is refused before a step changes anything.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .ops import device_tensor

__all__ = ['is_sharded', 'local', 'whole', 'layout', 'WholeNorms', 'LOCAL_NORMS', 'norms_for', 'as_like', 'check_layout', 'flat_start',
           'run_error', 'complete_max']

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a PyTorch without DTensor: nothing is ever sharded
    DTensor = Replicate = Shard = None


def is_sharded(t) -> bool:
    "Whether `t` is a DTensor."
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor of this rank's shard of `t` (`t` itself when it is not a DTensor). The same tensor
    object at every call, as the fused steps' caches need (`DTensor.to_local()` makes a new view)."""
    return t._local_tensor if is_sharded(t) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    "The whole tensor of DTensor `t` (gathered from every rank), `t` itself when it is plain."
    return t.full_tensor() if is_sharded(t) else t


def layout(t) -> tuple | None:
    "What params must share to be stepped together: (mesh, placements) of a DTensor, None for a plain tensor."
    return (t.device_mesh, tuple(t.placements)) if is_sharded(t) else None


def check_layout(p, g, where: str) -> None:
    "Raise `ValueError` when the engine cannot step sharded param `p` with gradient `g` shard by shard."
    if layout(g) != layout(p):
        raise ValueError(f"Invalid gradient for {where}: laid out as {_describe(g)}, its param as {_describe(p)}")
    for placement in p.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(f"Invalid param {where}: placement {placement} (fastforeach steps params sharded "
                             "(Shard) or replicated (Replicate) over their mesh)")


def _describe(t) -> str:
    return f"DTensor with placements {tuple(t.placements)}" if is_sharded(t) else "a plain tensor"


class WholeNorms:
    """`norms(*lists)`: for each list of tensors, the L2 norm of each whole param as a 1-d tensor.

    Over plain tensors these are their norms. Over the local shards of params sharded on the mesh dims
    `groups` (their process groups), the shards' squared norms are summed across ranks, every list and
    param in one all-reduce, so that each rank gets the norms of the whole params."""
    def __init__(self, groups: tuple = ()):
        self.groups = groups

    @property
    def is_local(self) -> bool: return not self.groups

    def __call__(self, *lists: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.complete(torch.stack([torch.stack(torch._foreach_norm(xs)) for xs in lists])))

    def rms(self, xs: list[torch.Tensor]) -> torch.Tensor:
        "The root mean square of the elements of each whole param, as a 1-d tensor (one all-reduce, as norms)."
        norms = torch.stack(torch._foreach_norm(xs))
        return root_mean_square(self, norms, device_tensor([x.numel() for x in xs], norms.dtype, norms.device))

    def complete(self, local_norms: torch.Tensor) -> torch.Tensor:
        "The whole params' norms from their shards' `local_norms` (any shape, one entry per shard)."
        if self.is_local: return local_norms
        squares = local_norms.square()
        for group in self.groups: dist.all_reduce(squares, group=group)
        return squares.sqrt()


LOCAL_NORMS = WholeNorms()


def root_mean_square(whole: WholeNorms, local_norms: torch.Tensor, local_numels: torch.Tensor) -> torch.Tensor:
    "‖x‖ / √n of whole params from their shards' norms and sizes: √n is the norm of n ones, completed alike."
    norm, root_n = whole.complete(torch.stack((local_norms, local_numels.sqrt())))
    return norm / root_n


def flat_start(t) -> int:
    """Where this rank's shard of `t` starts in `t`'s flat order: 0 for a plain tensor (a shard must be one
    run of it: see `run_error`)."""
    if not is_sharded(t) or t.ndim == 0: return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0] * math.prod(t.shape[1:])


def run_error(t) -> str | None:
    """Why this rank's shard of DTensor `t` is not one run of `t`'s flat order, or None: it is when `t` is
    sharded along dim 0 over at most one mesh dim (FSDP2's layout) and replicated over the others."""
    shards = [pl for pl in t.placements if not isinstance(pl, Replicate)]
    if not shards or (len(shards) == 1 and type(shards[0]) is Shard and shards[0].dim % max(t.ndim, 1) == 0): return None
    return f"placements {tuple(t.placements)} (a shard that is one run of the param's flat order needs Shard(0) on one mesh dim)"


def complete_max(values: list[torch.Tensor], origins: list) -> None:
    """Each of `values` (1-d, one per param of `origins`), this rank's part of it zero elsewhere, made the
    elementwise max over the ranks that shard its param, in place: one all-reduce per process group."""
    across: dict = {}
    for v, o in zip(values, origins):
        groups = norms_for(o).groups
        if groups: across.setdefault(groups, []).append(v)
    for groups, vs in across.items():
        flat = torch.cat(vs)
        for group in groups: dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        for v, part in zip(vs, flat.split([v.numel() for v in vs])): v.copy_(part)


def norms_for(p) -> WholeNorms:
    "The `WholeNorms` of params laid out as `p`: reduced over the mesh dims its placements shard."
    if not is_sharded(p): return LOCAL_NORMS
    mesh = p.device_mesh
    return WholeNorms(tuple(mesh.get_group(d) for d, placement in enumerate(p.placements) if isinstance(placement, Shard)))


def as_like(t: torch.Tensor, p: torch.Tensor, dtype: torch.dtype | None = None, placements: tuple | None = None
            ) -> torch.Tensor:
    """`t`, a tensor saved for param `p`, on `p`'s device, in `dtype` (`p`'s by default) and laid out as `p`
    (or as `placements` say, over `p`'s mesh): a plain tensor loaded for a sharded param is cut to this
    rank's shard (every rank holds the same whole tensor, so nothing is sent), a DTensor for a plain param
    is gathered whole."""
    dtype = dtype or p.dtype
    if is_sharded(p):
        from torch.distributed.tensor import distribute_tensor
        placements = tuple(placements or p.placements)
        if not is_sharded(t): return distribute_tensor(t.to(device=p.device, dtype=dtype), p.device_mesh, placements,
                                                       src_data_rank=None)
        t = t.to(dtype=dtype)
        return t if layout(t) == (p.device_mesh, placements) else t.redistribute(p.device_mesh, placements)
    if is_sharded(t): t = t.full_tensor()
    return t.to(device=p.device, dtype=dtype)


class WholeTensors:
    """For a rule that needs whole params (Muon's matrices): `gather(shards)`, each param's whole tensor
    from this rank's shards of it (an all-gather each); `shards(wholes)`, this rank's shards of whole
    tensors every rank holds alike (cut locally, nothing sent). Over plain tensors both give them back."""
    def __init__(self, origins: list[torch.Tensor]):
        self.origins = origins

    @property
    def sharded(self) -> bool:
        "Whether any of the params is sharded (else `gather` and `shards` give their tensors back)."
        return any(is_sharded(o) for o in self.origins)

    def gather(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [DTensor.from_local(t, o.device_mesh, o.placements, shape=o.shape, stride=o.stride(),
                                   run_check=False).full_tensor() if is_sharded(o) else t
                for t, o in zip(shards, self.origins)]

    def means(self, xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
        """The mean over `dim` (kept, as size 1) of each whole param's tensor, from this rank's shards `xs` of
        tensors laid out along `dim` as their params: local sums, completed over the mesh dims that shard
        `dim` (one all-reduce for each), divided by the whole param's size there."""
        sums = [x.sum(dim, keepdim=True) for x in xs]
        across: dict = {}
        for i, o in enumerate(self.origins):
            for d, placement in enumerate(o.placements if is_sharded(o) else ()):
                if isinstance(placement, Shard) and placement.dim % o.ndim == dim % o.ndim:
                    across.setdefault(o.device_mesh.get_group(d), []).append(i)
        for group, idx in across.items():
            flat = torch.cat([sums[i].flatten() for i in idx])
            dist.all_reduce(flat, group=group)
            for i, part in zip(idx, flat.split([sums[i].numel() for i in idx])): sums[i].copy_(part.view_as(sums[i]))
        return [s.div_(o.shape[dim]) for s, o in zip(sums, self.origins)]

    def shards(self, wholes: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import distribute_tensor
        return [distribute_tensor(w, o.device_mesh, o.placements, src_data_rank=None).to_local() if is_sharded(o)
                else w for w, o in zip(wholes, self.origins)]


def wrap_like(shard: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as sharded `p` whose local shard is `shard` (no copy, no communication).

    `DTensor.from_local` gives the DTensor its shard's storage offset, though the DTensor's own storage is
    empty, and `torch.save` then fails on it ("invalid python storage") when the shard does not start its
    storage, as a pack's state views do (torch 2.14): such a DTensor is built around an offset-free stand-in
    and then holds the shard itself."""
    stand_in = shard if shard.storage_offset() == 0 else torch.empty_like(shard)
    d = DTensor.from_local(stand_in, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
    d._local_tensor = shard
    return d
