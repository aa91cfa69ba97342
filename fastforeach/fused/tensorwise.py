"""Rules whose state is not shaped like its param (Adafactor's row and column statistics), done by one
compiled update per param (`TensorwiseStep`)."""
from __future__ import annotations

import math
from functools import cached_property
from typing import Callable

import torch

from ..distributed import WholeTensors
from ..ops import device_tensor
from ..precision import Rounding
from ..rules import StepRule
from .coefficients import Coefficients
from .compile import PLAIN, _compiled, _compiles, _seeds, coefficient_dtype
from .steps import PLAIN_CONTEXT, FusedStep, split_by_wd

__all__ = ['TensorwiseStep', 'MIN_NUMEL']

# Per device type, the size from which a param takes the compiled update: smaller ones take the foreach
# rule (on CPU a compiled call per 8 params costs more than the foreach ops on small tensors; measured on
# the MLP, xresnet50 and the transformer). Not for 16-bit params stepped in float32: they all take it.
MIN_NUMEL = {'cpu': 1 << 13}
# Params per compiled call. Each is a loop with reductions of its own in the graph: with 8, bf16 Adafactor's
# two graphs took 89 s to compile cold (CPU, 2 threads), with 2, 35 s; the params that take the compiled
# update are the large ones, for which a call more costs little.
CHUNK = 2


def _seen_as(t: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`t` as `shape`: a view where its strides allow, else a copy, also returned second, to be copied back
    into `t` once written (a channels-last kernel seen as a stack of its last two dims)."""
    try: return t.view(shape), None
    except RuntimeError:
        copy = t.reshape(shape).clone()
        return copy, copy


FOREACH_BYTES = 1 << 20  # of params per run of the foreach rule on small params: the chunks the foreach path takes on CPU


def _runs(idx: list[int], params, limit: int) -> list[list[int]]:
    "`idx` cut into runs of params of at most `limit` bytes together (or one param each, above it)."
    runs, size = [], limit
    for i in idx:
        n = params[i].numel() * params[i].element_size()
        if size + n > limit: runs.append([]); size = 0
        runs[-1].append(i); size += n
    return runs


class TensorwiseStep(FusedStep):
    """A rule done by its compiled `update(p, g, *state, c)`, `CHUNK` params a call: each param's tensors
    (param, gradient, state, Kahan buffer) seen with their leading dims flattened, so that the param has
    `ndim` dims and one graph serves every param (3 for a factored rule: a stack of matrices, its row and
    column statistics then (stack, rows) and (stack, columns)). `c` is laid out as `layout`:
    the decay factors (the decoupled factor 1 − lr·wd, or 1; the L2 factor wd, or 0), then what
    `coefficients(dtype=..., **hypers)` gives by name, `dtype` being the one the update computes in.

    Its state may have any shape (`param_shaped` False): reductions over a param's rows or columns in one
    graph. Params below `MIN_NUMEL` elements take the foreach rule, and all do where the update does not
    compile (16-bit params stepped in float32 aside: for them `ready` says whether it compiled). The update does the weight decay itself, where its rule wants it (Adafactor: after it has read
    the param's RMS). 16-bit params stepped in float32 are written back in the same call (see `_runner`)."""
    param_shaped = False

    def __init__(self, rule: Callable, update: Callable, coefficients: Callable, layout: Coefficients, ndim: int):
        super().__init__(rule)
        self.update, self.coefficients, self.layout, self.ndim = update, coefficients, layout, ndim

    @cached_property
    def _rule(self) -> StepRule: return StepRule.of(self.rule)

    def ready(self, p, hypers, rounding: Rounding | None = None) -> bool:
        """Whether it can step params like `p`: always where it may fall back on its foreach rule (params not
        stepped in float32: see `run`), else when the update compiled for them (written back as `rounding`
        says, for 16-bit params)."""
        return rounding is None or self.compiles(p, rounding)

    def compiles(self, p, rounding: Rounding | None = None) -> bool:
        "Whether the update compiled for params like `p` (written back as `rounding` says), on dummies: compiled once."
        rule, mode = self._rule, rounding.mode if rounding is not None else None
        states = tuple(rule.state[k].dtype_for(p) for k in rule.state_keys)
        comps = (rounding.kahan_dtype,) if rounding is not None and rounding.kahan else ()

        def attempt():
            # Sizes as large as real weights': inductor plans its loops (threads, vector width) from the first.
            like = torch.ones((8,) * (self.ndim - 1) + (1 << 16 >> 3 * (self.ndim - 1),), dtype=p.dtype, device=p.device)
            tensors = [like, torch.ones_like(like), *(rule.state[k].zeros(like, dtype) for k, dtype in zip(rule.state_keys, states)),
                       *(torch.zeros_like(like, dtype=dtype) for dtype in comps)]
            self._call([tensors] * CHUNK, torch.zeros(len(self.layout), dtype=coefficient_dtype(p.dtype), device=p.device), mode)
        return _compiles((self.update, p.dtype, states, comps, p.device.type, mode), [self.update], p, attempt)

    def _shapes(self, p) -> list[tuple]:
        """How the update sees each of `p`'s tensors (param, gradient, state, Kahan buffer): leading dims
        flattened into one, so that the param has `ndim` dims, and a statistic's reduced dims dropped (the
        update puts them back, of a size 1 it knows: traced sizes are not assumed to broadcast)."""
        whole = (-1, *p.shape[p.ndim - self.ndim + 1:]) if self.ndim > 1 else (-1,)
        def kept(spec): return tuple(n for d, n in enumerate(whole) if d - self.ndim not in spec.reduces)
        return [whole, whole, *(kept(self._rule.state[k]) for k in self._rule.state_keys), whole]

    def _call(self, per_param: list[list[torch.Tensor]], c: torch.Tensor, rounding: str | None) -> None:
        """The compiled update on each param's tensors (param, gradient, state, then its Kahan buffer with
        'kahan'), `CHUNK` params a call, the last call's padded with one-element dummies (one graph)."""
        like = per_param[0][0]
        fn = _compiled(self.update, PLAIN, like.dtype, like.device.type, rounding)
        dummies = self._dummies(tuple(t.dtype for t in per_param[0]), like.device)
        for at in range(0, len(per_param), CHUNK):
            seen = [[_seen_as(t, shape) for t, shape in zip(tensors, self._shapes(tensors[0]))]
                    for tensors in per_param[at:at + CHUNK]]
            lists = [[view for view, _ in views] + pad[len(seen):] for views, pad in zip(zip(*seen), dummies)]
            fn(lists + ([_seeds(like, CHUNK)] if rounding == 'stochastic' else []), c)
            for tensors, views in zip(per_param[at:at + CHUNK], seen):
                for t, (_, copy) in zip(tensors, views):
                    if copy is not None: t.copy_(copy.view(t.shape))

    def _dummies(self, dtypes: tuple, device) -> list[list[torch.Tensor]]:
        "`CHUNK` distinct one-element tensors per list, seen as the update sees it, of its dtype (padding: written, never read)."
        one = torch.zeros((1,) * self.ndim, device='meta')
        return [[torch.zeros([1] * len(shape), dtype=dtype, device=device) for _ in range(CHUNK)]
                for dtype, shape in zip(dtypes, self._shapes(one))]

    def run(self, params, grads, states, do_wd, hypers, *, wd, decouple_wd, plans, context=PLAIN_CONTEXT):
        p0, lr = params[0], hypers['lr']
        dtype = coefficient_dtype(p0.dtype)
        rule_c = self.layout.values(self.coefficients(dtype=dtype, **hypers))
        rounding = context.rounding.mode if context.rounding is not None else None
        comps = context.comps if rounding == 'kahan' else None
        least = MIN_NUMEL.get(p0.device.type, 0) if rounding is None else 0
        # Compiled (once) only when a param takes it; where it does not compile, the foreach rule steps them all.
        if rounding is None and any(p.numel() >= least for p in params) and not self.compiles(p0): least = math.inf
        small = [i for i, p in enumerate(params) if p.numel() < least]
        for run in _runs(small, params, FOREACH_BYTES):
            self._foreach(run, params, grads, states, hypers, [wd if do_wd[i] else 0. for i in run], decouple_wd, context)
        for idx, takes_wd in split_by_wd(do_wd, wd):
            idx = [i for i in idx if params[i].numel() >= least]
            if not idx: continue
            decay = wd if takes_wd else 0.
            factors = [1 - lr * decay, 0.] if decouple_wd else [1., decay]
            c = device_tensor([*factors, *rule_c], dtype, p0.device)
            self._call([[params[i], grads[i], *(ss[i] for ss in states), *([comps[i]] if comps else [])] for i in idx],
                       c, rounding)

    def _foreach(self, idx, params, grads, states, hypers, wds: list, decouple_wd: bool, context) -> None:
        """The foreach rule on the params at `idx`, each with weight decay `wds[i]`, as the fused step does it:
        decoupled (the rule's own, for a rule that does it), or L2 into new gradients."""
        rule, ps, gs = self._rule, [params[i] for i in idx], [grads[i] for i in idx]
        kwargs = dict(hypers)
        if not decouple_wd: gs = [g + wd * p if wd else g for g, p, wd in zip(gs, ps, wds)]
        if rule.uses_norms: kwargs['norms'] = context.norms
        if rule.uses_whole: kwargs['whole'] = WholeTensors(ps)
        if rule.decays: kwargs['decay'] = wds if decouple_wd else [0.] * len(ps)
        elif decouple_wd and any(wds): torch._foreach_mul_(ps, [1 - hypers['lr'] * wd for wd in wds])
        self.rule(ps, gs, *([ss[i] for i in idx] for ss in states), **kwargs)
