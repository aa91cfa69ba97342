"""fastai optimizers as `torch.distributed.checkpoint` expects them.

`torch.distributed.checkpoint.state_dict`'s `get_optimizer_state_dict` / `set_optimizer_state_dict` (and
`get_state_dict` / `set_state_dict`) take a `torch.optim.Optimizer`, or an iterable of them: they read
`param_groups` (dicts they may change), `state` keyed by param, and state dicts in torch.optim's format,
`{'state': {index: {...}}, 'param_groups': [{'params': [index, ...], **hypers}]}`. A fastai optimizer keeps
its hypers in `hypers` and its state dicts as lists: `{'state': [{...}, ...], 'hypers': [...]}`.

`TorchOptimizerView(opt)` shows a fastai optimizer (fastforeach's, or fastai's own) in torch.optim's
shape, with fastai's state keys, and loads through `opt.load_state_dict`, so a fastforeach optimizer
checks the whole state dict before it changes anything. Iterating a fastforeach optimizer yields its view,
so `get_optimizer_state_dict(model, opt)` takes the optimizer itself. Lookahead's slow weights travel as
per-param state `slow_weight` and its step count as `lookahead_count` in every param group.

To resume a sharded checkpoint in one process, or in fastai's own optimizer, load it as a full state dict
(`StateDictOptions(full_state_dict=True)`) through the view: its state then has fastai's layout and keys.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import torch

from .core.state import FLAGS, inner_optimizer

__all__ = ['TorchOptimizerView', 'as_torch_optimizer']

SLOW_WEIGHT, LOOKAHEAD_COUNT = 'slow_weight', 'lookahead_count'


def _is_lookahead(opt) -> bool: return inner_optimizer(opt) is not opt


class _Group(MutableMapping):
    "Param group `i` of a fastai optimizer as a torch.optim param-group dict: `params`, and its hypers, writable."
    def __init__(self, opt, i: int):
        self.opt, self.i = opt, i

    def __getitem__(self, key):
        return list(self.opt.param_lists[self.i]) if key == 'params' else self.opt.hypers[self.i][key]

    def __setitem__(self, key, value):
        if key == 'params': raise TypeError("the params of a fastai optimizer's param group cannot be replaced")
        self.opt.hypers[self.i][key] = value

    def __delitem__(self, key): del self.opt.hypers[self.i][key]
    def __iter__(self): return iter(['params', *self.opt.hypers[self.i]])
    def __len__(self): return 1 + len(self.opt.hypers[self.i])


class TorchOptimizerView(torch.optim.Optimizer):
    """A fastai optimizer `opt` seen as a `torch.optim.Optimizer`, for `torch.distributed.checkpoint`.

    `param_groups` are views of `opt`'s param lists and hypers (setting a group's `lr` sets `opt`'s),
    `state` is `opt`'s per-param state, `step` and `zero_grad` are `opt`'s, and `state_dict` /
    `load_state_dict` speak torch.optim's format with fastai's state keys."""
    def __init__(self, opt):  # torch.optim.Optimizer.__init__ would build param groups of its own
        self.opt, self.defaults = opt, {}
        self._inner = inner_optimizer(opt)

    def __repr__(self): return f"TorchOptimizerView({type(self.opt).__name__})"

    @property
    def param_groups(self) -> list[_Group]: return [_Group(self._inner, i) for i in range(len(self._inner.param_lists))]

    @property
    def state(self) -> dict:
        """Per-param state of the params that have stepped (fastai's Learner marks params with flags, `do_wd`
        and `force_train`, before any step). torch.distributed.checkpoint steps an optimizer whose `state`
        is empty once, with zero gradients and lr 0, to create the state it will load into."""
        return {p: s for p, s in self._inner.state.items() if any(k not in FLAGS for k in s)}

    def _params(self) -> list[torch.Tensor]: return [p for pg in self._inner.param_lists for p in pg]

    def step(self, closure=None):
        if closure is None: return self.opt.step()
        with torch.enable_grad(): loss = closure()
        self.opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self._params():
            if p.grad is None: continue
            if set_to_none: p.grad = None
            else: p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        "torch.optim's format: state by param index (params without state left out), groups with their hypers."
        sd = self.opt.state_dict()
        lookahead = _is_lookahead(self.opt)
        slow = [s for pg in sd['slow_weights'] for s in pg] if lookahead and sd['slow_weights'] is not None else None
        state = {}
        for i, s in enumerate(sd['state']):
            s = dict(s)
            if slow is not None: s[SLOW_WEIGHT] = slow[i]
            if s: state[i] = s
        groups, at = [], 0
        for pg, hypers in zip(self._inner.param_lists, sd['hypers']):
            group = {'params': list(range(at, at + len(pg))), **hypers}
            if lookahead: group[LOOKAHEAD_COUNT] = sd['count']
            groups.append(group)
            at += len(pg)
        return {'state': state, 'param_groups': groups}

    def load_state_dict(self, state_dict: dict) -> None:
        "Load a state dict in torch.optim's format (params by index or by name, matched by position in each group)."
        if not isinstance(state_dict, dict) or 'state' not in state_dict or 'param_groups' not in state_dict:
            raise ValueError("Invalid state dict: expected torch.optim's format, a dict with 'state' and 'param_groups'")
        groups, state = state_dict['param_groups'], state_dict['state']
        if len(groups) != len(self._inner.param_lists):
            raise ValueError(f"Invalid state dict: {len(groups)} param groups, the optimizer has "
                             f"{len(self._inner.param_lists)}")
        states, hypers = [], []
        for gi, (group, pg) in enumerate(zip(groups, self._inner.param_lists)):
            if len(group['params']) != len(pg):
                raise ValueError(f"Invalid state dict: param group {gi} has {len(group['params'])} params, "
                                 f"the optimizer's has {len(pg)}")
            states += [dict(state.get(key, {})) for key in group['params']]
            hypers.append({k: v for k, v in group.items() if k not in ('params', LOOKAHEAD_COUNT)})
        sd = {'state': states, 'hypers': hypers}
        if _is_lookahead(self.opt):
            slow = [s.pop(SLOW_WEIGHT, None) for s in states]
            sd['count'] = groups[0].get(LOOKAHEAD_COUNT, 0) if groups else 0
            if all(s is None for s in slow): sd['slow_weights'] = None
            elif any(s is None for s in slow): raise ValueError("Invalid state dict: some params lack a 'slow_weight'")
            else:
                it = iter(slow)
                sd['slow_weights'] = [[next(it) for _ in pg] for pg in self._inner.param_lists]
        self.opt.load_state_dict(sd)


def as_torch_optimizer(opt) -> TorchOptimizerView:
    "`opt`, a fastai optimizer (fastforeach's or fastai's own, Lookahead included), as a `torch.optim.Optimizer`."
    return TorchOptimizerView(opt)
