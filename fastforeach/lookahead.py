"Lookahead, which wraps any optimizer, and ranger (RAdam inside Lookahead)."
from numbers import Integral, Real
from typing import Callable

import torch
from fastai.optimizer import Lookahead as _FastaiLookahead
from fastcore.foundation import L

from .distributed import as_like, local
from .precision import COMP, is_low_precision
from .fastai import ForEachOptimizer
from .core import inner_optimizer
from .rules import LIKE_PARAM, check_int
from .ops import device_tensor
from .fused import (PLAIN, Coefficients, Plans, chunked, coefficient_dtype, compiles, flat_alias, is_dense, pack_max_numel,
                    run_chunks)
from .optimizers.radam import RAdamForEachOptimizer

__all__ = ['Lookahead', 'RangerForEachOptimizer', 'lookahead_update', 'inner_optimizer', 'check_lookahead',
           'slow_dtype', 'slow_weight', 'sync_16_bit', 'sync_slow_weights']


SYNC = Coefficients('alpha', decay=False)


def lookahead_update(slow, fast, c):
    "One tensor of the slow-weight sync, in one pass: slow ← slow + α·(fast − slow);  fast ← slow."
    slow.lerp_(fast, c[SYNC.alpha])
    fast.copy_(slow)


_SYNC = ((lookahead_update, PLAIN),)


def check_lookahead(k, alpha, prefix: str = '', where: str = '') -> None:
    "Raise `ValueError` naming `k` or `alpha` (as `prefix`k, `prefix`alpha, `where` they are) when out of range."
    check_int(f'{prefix}k', k, 1, where=where)
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not 0 < alpha <= 1:
        raise ValueError(f"Invalid {prefix}alpha{where}: {alpha!r} (must be a real number in (0, 1])")


def slow_dtype(inner, p) -> torch.dtype:
    "float32 for the slow weights of 16-bit params stepped in float32 (see `sync_16_bit`), else `p`'s dtype."
    rounding = getattr(inner, 'rounding', None)
    return torch.float32 if rounding is not None and rounding.in_float32(p) else p.dtype


def slow_weight(inner, p) -> torch.Tensor:
    "`p`'s slow weight: the weight `inner`'s steps see (with its Kahan buffer), in `slow_dtype`."
    comp = inner.state[p].get(COMP) if hasattr(inner, 'rounding') and p in inner.state else None
    w = p.detach().to(slow_dtype(inner, p))
    return w + comp if comp is not None and w.dtype == torch.float32 else w.clone()


def sync_16_bit(inner, alpha, slow, fast, params):
    """The sync of 16-bit params, as `inner`'s `rounding` says: with Kahan summation or stochastic rounding,
    the slow weights are float32 (their moves are as small as the steps') and the fast ones are written back
    from them as the steps write them; with 'nearest', or a fastai optimizer inside, fastai's own sync, op by op."""
    rounding = getattr(inner, 'rounding', None)
    if rounding is None or not rounding.in_float32(fast[0]):
        for s, f in zip(slow, fast):
            s.add_(f - s, alpha=alpha)
            f.copy_(s)
        return
    comps = rounding.compensations(params, [inner.state[p] for p in params])
    if comps is not None: comps = [local(c) for c in comps]
    def sync(w):
        torch._foreach_lerp_(slow, w, alpha)
        torch._foreach_copy_(w, slow)
    rounding.update_in_float32(fast, comps, sync)


def sync_slow_weights(inner, alpha, slow, fast, params, sync: Callable) -> None:
    """One group's sync: 16-bit params as `sync_16_bit` says, the others by `sync(slow, fast)` (slow ← slow +
    alpha·(fast − slow), then fast ← slow). `slow`, `fast`: the slow weights and the params as this rank's
    shards; `params`: the params themselves."""
    low = [i for i, f in enumerate(fast) if is_low_precision(f.dtype)]
    if low:
        sync_16_bit(inner, alpha, *([xs[i] for i in low] for xs in (slow, fast, params)))
        rest = [i for i in range(len(fast)) if i not in set(low)]
        slow, fast = [slow[i] for i in rest], [fast[i] for i in rest]
    if slow: sync(slow, fast)


class Lookahead(_FastaiLookahead):
    """fastai's `Lookahead` with foreach slow-weight updates: every `k` steps of `opt`,
    slow ← slow + alpha·(fast − slow), then fast ← slow. Wraps fastforeach and fastai optimizers alike;
    its `state_dict` has fastai's shape (`count`, `slow_weights`). `fused=True` compiles the sync into one
    pass per tensor (see `fused/`)."""
    def __init__(self, opt, k=6, alpha=0.5, *, fused=False):
        check_lookahead(k, alpha)
        super().__init__(opt, k=k, alpha=alpha)
        self.fused, self._plans, self._sync_checked = fused, Plans(), False

    __iter__ = ForEachOptimizer.__iter__

    def zero_grad(self): self.opt.zero_grad()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        self._prepare()
        self.opt.step()
        self.finish_step()
        return loss

    def check_accumulation(self) -> None: self.opt.check_accumulation()

    def step_params(self, params) -> None:
        "The inner optimizer's step of only `params`: one bucket of a gradient release (see `callbacks/release.py`)."
        self._prepare()
        self.opt.step_params(params)

    def _prepare(self):
        check_lookahead(self.k, self.alpha)
        if self.slow_weights is None: self._copy_weights()
        if not self._sync_checked:
            # Compile the sync at this optimizer's first step, with the step's own compiling, rather than
            # stall at step k (or at the first after loading a state dict).
            for slow, fast, _ in self._weight_lists(): self._compiled_sync(slow, fast)
            self._sync_checked = True

    def finish_step(self) -> None:
        """After the inner optimizer's step (of every bucket, with gradient release): count it, and sync every
        `k`; with optimizer accumulation, only a step that moved the params counts."""
        accumulation = getattr(self.opt, 'accumulation', None)
        if accumulation is not None and accumulation[0] != accumulation[1] - 1: return
        self.count += 1
        if self.count % self.k == 0:
            with torch.no_grad():
                for slow, fast, params in self._weight_lists():
                    sync_slow_weights(self.opt, self.alpha, slow, fast, params, self._sync)

    def _weight_lists(self):
        "Per param group: the slow weights and the params, as this rank's shards where they are DTensors; the params."
        for slow_pg, fast_pg in zip(self.slow_weights, self.param_lists):
            yield [local(s) for s in slow_pg], [local(p) for p in fast_pg], list(fast_pg)

    def _slow_dtype(self, p) -> torch.dtype: return slow_dtype(self.opt, p)

    def _copy_weights(self):
        "The slow weights: the weights the steps see (with their Kahan buffers), in `_slow_dtype`."
        self.slow_weights = L(L(slow_weight(self.opt, p) for p in pg) for pg in self.param_lists)

    def _sync(self, slow, fast):
        """With `fused`, params above the pack threshold sync in one compiled pass each; smaller ones, for
        which a compiled loop per tensor costs more than the two list ops (MLP on CPU: 1.09 vs 0.29 ms),
        and every param whose layout, dtype or device differs from the first's, with foreach."""
        if not slow: return
        like, large = fast[0], self._compiled_sync(slow, fast)
        if large:
            c = device_tensor([self.alpha], coefficient_dtype(like.dtype), like.device)
            lists, _ = self._plans.get(id(like), slow + fast, lambda: (
                [[flat_alias(ts[i]) for i in large] for ts in (slow, fast)], ()))
            run_chunks(_SYNC, chunked(lists), c, len(large))
            rest = sorted(set(range(len(fast))) - set(large))
            slow, fast = [slow[i] for i in rest], [fast[i] for i in rest]
        if slow:
            torch._foreach_lerp_(slow, fast, self.alpha)
            torch._foreach_copy_(fast, slow)

    def _compiled_sync(self, slow, fast) -> list[int]:
        "Indices of the params that sync compiled (see `_sync`), once the sync has compiled for them; else none."
        if not (self.fused and slow): return []
        like = fast[0]
        large = [i for i, (s, f) in enumerate(zip(slow, fast))
                 if f.numel() > pack_max_numel(f.device) and is_dense(f) and s.stride() == f.stride()
                 and s.dtype == f.dtype == like.dtype and f.device == like.device]
        return large if large and compiles(_SYNC, like, 2, 1) else []

    def _set_hyper(self, k, v): self.opt._set_hyper(k, v)

    def fastai_state_dict(self) -> dict:
        "`state_dict()` with the inner optimizer's state kept in few bits decoded (see `ForEachOptimizer.fastai_state_dict`)."
        inner = self.opt.fastai_state_dict() if hasattr(self.opt, 'fastai_state_dict') else self.opt.state_dict()
        return {**inner, 'count': self.count, 'slow_weights': self.slow_weights}

    def load_state_dict(self, sd: dict):
        "Load a state dict saved by this Lookahead or fastai's; `sd` is left as it was."
        if not isinstance(sd, dict) or 'count' not in sd or 'slow_weights' not in sd:
            raise ValueError("Invalid state dict: a Lookahead state dict needs 'count' and 'slow_weights'")
        count, slow = sd['count'], sd['slow_weights']
        if not isinstance(count, Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(f"Invalid state dict: 'count' is {count!r}, expected an int >= 0")
        if slow is not None:
            if len(slow) != len(self.param_lists):
                raise ValueError(f"Invalid state dict: 'slow_weights' has {len(slow)} param groups, "
                                 f"the optimizer has {len(self.param_lists)}")
            for gi, (slow_pg, pg) in enumerate(zip(slow, self.param_lists)):
                if len(slow_pg) != len(pg):
                    raise ValueError(f"Invalid state dict: 'slow_weights' group {gi} has {len(slow_pg)} params, "
                                     f"the optimizer has {len(pg)}")
                for pi, (s, p) in enumerate(zip(slow_pg, pg)):
                    got = LIKE_PARAM.unlike(s, p)
                    if got: raise ValueError(f"Invalid state dict: 'slow_weights' group {gi}, param {pi} {got}")
        inner = {k: v for k, v in sd.items() if k not in ('count', 'slow_weights')}
        self.opt.load_state_dict(inner)  # checks before it changes anything
        self.count = int(count)
        self.slow_weights = None if slow is None else L(
            L(as_like(s.detach(), p, self._slow_dtype(p)) for s, p in zip(slow_pg, pg))
            for slow_pg, pg in zip(slow, self.param_lists))


class RangerForEachOptimizer(Lookahead):
    "fastai's `ranger`: `RAdamForEachOptimizer` inside `Lookahead`."
    def __init__(self, params, lr, mom=0.95, wd=0.01, eps=1e-6, k=6, alpha=0.5, *, sqr_mom=0.99, beta=0.,
                 decouple_wd=True, fused=False, rounding='kahan', kahan_dtype=torch.float32, state_format=None):
        check_lookahead(k, alpha)
        super().__init__(RAdamForEachOptimizer(params, lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=beta,
                                               decouple_wd=decouple_wd, fused=fused, rounding=rounding,
                                               kahan_dtype=kahan_dtype, state_format=state_format), k=k, alpha=alpha, fused=fused)
