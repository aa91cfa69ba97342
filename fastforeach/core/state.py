"""Per-param state, from the rules' declarations: created on a param's first step, checked and loaded from
state dicts; and the one way to find the optimizer that holds the state."""
from __future__ import annotations

import torch

from ..distributed import as_like, is_sharded, local, whole, wrap_like
from ..lowbit import CODES, SCALE, StateFormat, saved_format, unlike_any
from ..precision import COMP, Rounding, correction, master_value
from ..rules import LIKE_PARAM, StepRule

__all__ = ['state_lists', 'state_dtype', 'check_param_state', 'load_param_state', 'inner_optimizer', 'FLAGS']

FLAGS = ('do_wd', 'force_train')  # per-param marks set by fastai's Learner (or `no_wd`): configuration, not state


def inner_optimizer(opt):
    "The optimizer that holds the per-param state and steps: the one a Lookahead wraps, or `opt` itself."
    return opt.opt if hasattr(opt, 'slow_weights') and hasattr(opt, 'opt') else opt


def state_dtype(rule: StepRule, key: str, p, rounding: Rounding) -> torch.dtype:
    "The dtype of `rule`'s state `key` of `p`: as its `StateSpec` says (weights of 16-bit `p` in float32)."
    return rule.state[key].dtype_for(p, rounding.in_float32(p))


def new_state(rule: StepRule, key: str, p, rounding: Rounding) -> torch.Tensor:
    "`rule`'s state `key` for `p`, as a first step makes it: zeros, as its `StateSpec` says, in `state_dtype`."
    return rule.state[key].zeros(p, state_dtype(rule, key, p, rounding))


def state_lists(rule: StepRule, chunk, rounding: Rounding) -> list[list[torch.Tensor]]:
    """The chunk's state tensors, one list per state key of `rule` (local shards for a sharded chunk); missing
    ones are created as zeros first, as the rule's `StateSpec`s say (like their params, DTensors sharded
    alike for DTensor params, unless declared otherwise). Only in a step, after every check has passed:
    a refused step leaves no trace."""
    keys = rule.state_keys
    try: lists = [[state[key] for state in chunk.states] for key in keys]
    except KeyError:
        for p, state in zip(chunk.origins, chunk.states):
            for key in keys:
                if key not in state: state[key] = new_state(rule, key, p, rounding)
        lists = [[state[key] for state in chunk.states] for key in keys]
    return [[local(t) for t in xs] for xs in lists] if chunk.sharded else lists


def check_param_state(rule: StepRule, p, state, where: str) -> None:
    "Raise `ValueError` saying which key of `state`, saved for `p` (at `where`), does not fit `rule`."
    if not isinstance(state, dict): raise ValueError(f"Invalid state dict: {where}: state is not a dict")
    for key in rule.state_keys:
        if key + CODES in state:  # kept in few bits (see `lowbit.py`)
            codes, scales = state[key + CODES], state.get(key + SCALE)
            if saved_format(codes, scales, p) is None:
                raise ValueError(f"Invalid state dict: {where}: state {key!r}: {unlike_any(codes, scales, p)}")
            continue
        # A param that never stepped has no state in fastai either.
        if key not in state:
            if 'step' in state or any(k in state or k + CODES in state for k in rule.state_keys):
                raise ValueError(f"Invalid state dict: {where}: missing state {key!r}")
            continue
        got = rule.state[key].unlike(state[key], p)
        if got: raise ValueError(f"Invalid state dict: {where}: state {key!r} {got}")
    if COMP in state:
        got = LIKE_PARAM.unlike(state[COMP], p)
        if got: raise ValueError(f"Invalid state dict: {where}: state {COMP!r} {got}")
    if rule.counts_steps and any(k in state for k in rule.state_keys):
        step = state.get('step')
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"Invalid state dict: {where}: state 'step' is {step!r}, expected an int >= 1")


def load_param_state(rule: StepRule, p, state: dict, rounding: Rounding, formats: StateFormat | None = None) -> dict:
    """A copy of `state` (checked) as `p`'s: each state tensor on `p`'s device, in its dtype, laid out as `p` for
    state shaped like it; a Kahan buffer kept where `rounding` sums `p` with Kahan, in its buffers' dtype.
    State kept in few bits is kept so where `formats` keeps it in the same format, and decoded (then encoded
    in `formats`' format, rounded to nearest) where not; full-precision state is encoded where `formats` asks."""
    s, low = dict(state), formats.keys(rule, p) if formats is not None else {}
    for key in rule.state_keys:
        nonnegative, fmt = rule.state[key].nonnegative, low.get(key)
        if key + CODES in s:
            codes, scales = s.pop(key + CODES).to(p.device), whole(s.pop(key + SCALE)).to(p.device)
            saved = saved_format(codes, scales, p)
            if saved == fmt:  # a sharded param's codes laid out as it, its scales whole (see `lowbit.py`)
                codes = as_like(codes, p, torch.uint8) if is_sharded(p) else codes.view(p.shape if fmt.bits == 8 else (-1,))
                s[key + CODES], s[key + SCALE] = codes, scales
                continue
            value = saved.decode(whole(codes), scales, nonnegative, p.shape)
        elif key in s: value = s.pop(key)
        else: continue
        if fmt is not None:
            codes, s[key + SCALE] = fmt.encode(whole(value).to(device=p.device, dtype=torch.float32), nonnegative)
            s[key + CODES] = as_like(codes, p, torch.uint8) if is_sharded(p) else codes
        else:
            placements = rule.state[key].placements_for(p) if is_sharded(p) else None
            s[key] = as_like(value, p, state_dtype(rule, key, p, rounding), placements)
    if COMP in s:
        comp = s.pop(COMP)
        if rounding.kahan and rounding.in_float32(p): s[COMP] = comp_like(comp, p, rounding.comp_dtype)
    return s


def comp_like(comp: torch.Tensor, p, dtype: torch.dtype) -> torch.Tensor:
    """A loaded buffer `comp` of 16-bit `p` as a buffer in `dtype`, laid out as `p`: cast between Kahan buffers;
    between a Kahan buffer and a 24-bit master's byte, made again from the float32 weight they stand for."""
    if (comp.dtype == torch.int8) == (dtype == torch.int8): return as_like(comp, p, dtype)
    comp = as_like(comp, p, comp.dtype)
    weight = local(p).detach()
    made = correction(master_value(weight, local(comp)), weight, dtype)
    return wrap_like(made, p) if is_sharded(p) else made
