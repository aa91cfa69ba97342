"""Lookahead on the torch face: a `torch.optim.Optimizer` around any of the face's optimizers."""
from __future__ import annotations

from numbers import Integral

import torch

from ..lookahead import check_lookahead, slow_dtype, slow_weight, sync_slow_weights
from ..distributed import as_like, local
from ..rules import LIKE_PARAM
from .base import TorchForEachOptimizer

__all__ = ['Lookahead']

SLOW = 'slow_weight'  # each param's slow weight, in the inner optimizer's state


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around `optimizer`, one of the face's: every `k` of its steps,
    slow ← slow + alpha·(fast − slow), then fast ← slow, as one foreach op over each group.

    Its `param_groups` and `state` are the inner optimizer's, so that LR schedulers and checkpoints see
    one optimizer: each param's slow weight is its state's `slow_weight` (made at the first step; float32
    for 16-bit params stepped in float32), and the groups carry `lookahead_k`, `lookahead_alpha` and
    `lookahead_count`, saved and loaded with the state dict."""
    def __init__(self, optimizer: TorchForEachOptimizer, k: int = 6, alpha: float = 0.5):
        # torch.optim.Optimizer.__init__ would make param groups of its own: this one shares the inner's.
        if not isinstance(optimizer, TorchForEachOptimizer):
            raise ValueError(f"Invalid optimizer: {type(optimizer).__name__} (Lookahead wraps a fastforeach.optim "
                             "optimizer)")
        check_lookahead(k, alpha)
        self.optimizer, self.defaults = optimizer, optimizer.defaults
        for group in optimizer.param_groups:
            group.update(lookahead_k=k, lookahead_alpha=alpha, lookahead_count=group.get('lookahead_count', 0))

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)

    def __repr__(self) -> str: return f"Lookahead({self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None: self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        "The inner optimizer's step; every `lookahead_k`-th, the sync (see the class docstring)."
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        groups = self.param_groups
        for i, group in enumerate(groups):
            check_lookahead(group['lookahead_k'], group['lookahead_alpha'], 'lookahead_', f" for param group {i}")
        for group in groups:
            for p in group['params']:
                if SLOW not in self.state[p]: self.state[p][SLOW] = slow_weight(self.optimizer, p)
        self.optimizer.step()
        for group in groups:
            group['lookahead_count'] += 1
            if group['lookahead_count'] % group['lookahead_k']: continue
            params, alpha = group['params'], group['lookahead_alpha']
            def sync(slow, fast):
                torch._foreach_lerp_(slow, fast, alpha)
                torch._foreach_copy_(fast, slow)
            sync_slow_weights(self.optimizer, alpha, [local(self.state[p][SLOW]) for p in params],
                              [local(p) for p in params], params, sync)
        return loss

    def state_dict(self) -> dict:
        "The inner optimizer's, slow weights and the lookahead's group entries included (torch's format)."
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """The inner optimizer's `load_state_dict`, the slow weights taken apart (kept in their dtype, laid out
        as their params) and checked with it, nothing changed if anything does not fit."""
        if not isinstance(state_dict, dict) or 'state' not in state_dict or 'param_groups' not in state_dict:
            raise ValueError("Invalid state dict: expected a dict with 'state' and 'param_groups' (torch.optim's format)")
        params = [p for group in self.param_groups for p in group['params']]
        ids = [i for group in state_dict['param_groups'] for i in group['params']]
        by_id = dict(zip(ids, params))
        slow, inner = {}, {'state': {}, 'param_groups': state_dict['param_groups']}
        for i, s in state_dict['state'].items():
            s = dict(s)
            if SLOW in s and i in by_id:
                got = LIKE_PARAM.unlike(s.pop(SLOW), by_id[i])
                if got: raise ValueError(f"Invalid state dict: param {i}: state {SLOW!r} {got}")
                slow[i] = state_dict['state'][i][SLOW]
            inner['state'][i] = s
        for gi, group in enumerate(state_dict['param_groups']):
            count = group.get('lookahead_count', 0)
            if not isinstance(count, Integral) or isinstance(count, bool) or count < 0:
                raise ValueError(f"Invalid state dict: param group {gi}: 'lookahead_count' is {count!r}, expected an int >= 0")
            check_lookahead(group.get('lookahead_k', 6), group.get('lookahead_alpha', 0.5), 'lookahead_',
                            f" in the state dict's param group {gi}")
        self.optimizer.load_state_dict(inner)  # checks everything else before it changes anything
        for group in self.param_groups:
            for key, default in (('lookahead_k', 6), ('lookahead_alpha', 0.5), ('lookahead_count', 0)):
                group.setdefault(key, default)
        for i, s in slow.items():
            p = by_id[i]
            self.state[p][SLOW] = as_like(s.detach(), p, slow_dtype(self.optimizer, p))
