"""Rules done by their compiled per-tensor updates (`CompiledStep`)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops import device_tensor
from ..precision import COMP, SEEDED, Rounding
from ..rules import StepRule
from .coefficients import Coefficients
from .compile import CHUNK, DECAY, PLAIN, chunked, coefficient_dtype, compiles, flat_compiles, run_chunks
from .layout import flat_alias
from .packs import Pack, PackStep, pack_chunk, pack_max_numel
from .steps import PLAIN_CONTEXT, FusedStep, split_by_wd

__all__ = ['CompiledStep']

class CompiledStep(FusedStep):
    """A rule done by its compiled per-tensor `update(p, g, *state, c)`, where `c` is the coefficient vector
    laid out as `layout` says (see `coefficients.py`): the decay factors, then what `coefficients(**hypers)`
    gives by name (from the rule's hypers, and `step` when it counts steps); updates read it by name,
    `c[layout.lr]`. `update` changes `p` and the state in place and returns None, or a tuple of 0-d tensors
    stored under the state keys `returns`.

    `choose`, when given, picks the update for this step's hypers among a few (RAdam: with or without
    SAdam's softplus), so that no update pays for a branch it does not take.

    `then`, when given, is a second pass, `then(p, *state, *update's outputs, c)`, compiled apart: its
    inputs must be complete before it starts (LAMB's norms), and two graphs keep inductor from holding a
    full-size temporary between the passes. Both passes get the whole `c` and do the weight decay
    themselves, so that the param is written once, in the second.

    Params of at most `pack_max_numel` elements are stepped as one `Pack`: by the update itself when it
    returns nothing and has no second pass, which must then be elementwise (no reduction over a tensor);
    else by `pack_step`, when given.

    `own_decay`: the update does the weight decay itself (Adan decays after its step): `c[layout.decay]` is
    then the decoupled wd itself (or 0).

    `chunk`: tensors per compiled call for the others. An update that reduces each tensor before it
    writes (Larc) takes 1: given several, inductor runs every tensor's reduction before any update, so
    none finds its tensor still in cache (Larc on xresnet50, CPU: 10% faster one at a time).

    16-bit params stepped in float32 (see `precision.py`): each compiled call works on float32 working
    values and writes the params (and their Kahan buffers) back in the same pass; packs hold float32
    working values (see `Pack`)."""
    def __init__(self, rule: Callable, update: Callable, coefficients: Callable, layout: Coefficients,
                 returns: tuple[str, ...] = (), choose: Callable | None = None, then: Callable | None = None,
                 pack_step: PackStep | None = None, chunk: int = CHUNK, own_decay: bool = False):
        super().__init__(rule)
        self.layout = layout
        self.own_decay = own_decay
        self.update, self.coefficients, self.returns, self.choose, self.then = update, coefficients, returns, choose, then
        self.pack_step, self.chunk = pack_step, chunk
        self.packs = pack_step is not None or (not returns and then is None)

    def _phases(self, hypers) -> tuple:
        update = self.update if self.choose is None else self.choose(hypers)
        if self.then: return ((update, PLAIN), (self.then, PLAIN))
        return ((update, PLAIN if self.own_decay else DECAY),)

    @property
    def _state_keys(self) -> tuple[str, ...]: return self._rule.state_keys

    @property
    def _n_lists(self) -> int: return 2 + len(self._state_keys)

    def ready(self, p, hypers, rounding: Rounding | None = None) -> bool:
        "Whether every phase compiled for params like `p` (written back as `rounding` says, for 16-bit params)."
        n_coefficients = len(self.layout)
        # Packs stepped by the update run it on flat tensors, in a graph of `pack_chunk` tensors per list.
        chunks = {self.chunk, pack_chunk(p.device)} if self.packs and self.pack_step is None else {self.chunk}
        if rounding is None:
            return (all(compiles(self._phases(hypers), p, self._n_lists, n_coefficients, chunk) for chunk in chunks) and
                    all(flat_compiles(phase, p, n_coefficients) for phase in self.pack_phases))
        comps = (rounding.comp_dtype,) if rounding.kahan else ()
        # Weight-like state of 16-bit params is float32 (ScheduleFreeAdam's z: see `StateSpec.weight`).
        states = tuple(torch.float32 if k in self._rule.weight_state else p.dtype for k in self._state_keys)
        return (all(compiles(self._phases(hypers), p, self._n_lists + len(comps), n_coefficients, chunk, rounding.mode,
                             (p.dtype, p.dtype, *states, *comps)) for chunk in chunks) and
                all(flat_compiles(phase, p, n_coefficients, None, rounding.mode, rounding.comp_dtype)
                    for phase in self.pack_phases))

    @property
    def pack_phases(self): return self.pack_step.phases if self.pack_step else ()

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        phases, rule_c = self._phases(hypers), self.layout.values(self.coefficients(**hypers))
        p0, lr = params[0], hypers['lr']
        outs, stored = [None] * len(params), {}
        rounding = context.rounding.mode if context.rounding is not None else None
        comps = context.comps if context.rounding is not None and context.rounding.kahan else None
        # Packs adopt their params (see `Pack`) unless they are shards of DTensors.
        adopt = context.sizes is None
        # Sizes of whole params, so that shards are packed alike, in the same order, on every rank.
        numels, largest = context.sizes or [p.numel() for p in params], pack_max_numel(p0.device)
        # Shards of params: an update that takes norms inside its compiled loop would take the shard's, so
        # every param goes through the pack, whose norms are completed across ranks.
        if self.pack_step is not None and not context.norms.is_local: largest = math.inf
        for idx, takes_wd in split_by_wd(do_wd, wd):
            c, l2 = self.coefficient_vector(rule_c, p0, lr, wd if takes_wd else 0., decouple_wd)
            small = sorted((i for i in idx if numels[i] <= largest), key=numels.__getitem__) if self.packs else []
            if small:
                pack = plans.pack(self, params, states, small, comps, adopt)
                for i, r in zip(small, self._run_pack(pack, phases, c, l2 != 0, small, grads, states, comps, stored,
                                                      context.norms, rounding)):
                    outs[i] = r
                idx = [i for i in idx if numels[i] > largest]
                if not idx: continue
            lists, ops = plans.operands(self, params, grads, [*states, *([comps] if comps else [])], idx, flat_alias)
            for i, r in zip(idx, run_chunks(phases, chunked(lists, self.chunk), c, len(idx), rounding)): outs[i] = r
            for o in ops: o.write_back()
        stored.update({key: [out[k] for out in outs] for k, key in enumerate(self.returns)})
        return stored or None

    def coefficient_vector(self, rule_c: list, like: torch.Tensor, lr: float, wd: float, decouple_wd: bool
                           ) -> tuple[torch.Tensor, float]:
        "`c` for params like `like` that take weight decay `wd` (0: none), from the rule's coefficients; and its L2 factor."
        decay, l2 = (1 - lr * wd, 0.) if wd and decouple_wd else (1., wd)
        if self.own_decay: decay = wd if decouple_wd else 0.
        return device_tensor([decay, l2, *rule_c], coefficient_dtype(like.dtype), like.device), l2

    def _run_pack(self, pack: Pack, phases, c, l2: bool, idx, grads, states, comps, stored, norms, rounding) -> list:
        """Step `pack`, the params at `idx`; put the state (and Kahan buffers) it moved into `stored` (state
        key -> one value per param). What the update returns for each param (None for each when it returns
        nothing)."""
        pack.take_grads([grads[i] for i in idx])
        def step(c):
            if self.pack_step: return self.pack_step.run(pack, c, l2, norms, rounding)
            return run_chunks(phases, chunked(pack.lists, pack_chunk(pack.flat_p.device)), c, 1, rounding)[0]
        # A graph replays the kernels on the tensors it captured: only for packs that own their buffers and
        # take nothing from outside but the gradients and `c` (see `graphs.py`).
        if pack.adopted and norms.is_local and rounding not in SEEDED:
            outs = pack.graph.step((phases, l2, rounding, pack.flat_g.data_ptr()), c, step)
        else: outs = step(c)
        pack.give_back()
        keys, lists = (*self._state_keys, *((COMP,) if comps else ())), (*states, *((comps,) if comps else ()))
        for key, ss, views in zip(keys, lists, pack.moved):
            if views is None: continue
            values = stored.setdefault(key, list(ss))
            for i, v in zip(idx, views): values[i] = v
        return outs if outs is not None else [None] * len(idx)
