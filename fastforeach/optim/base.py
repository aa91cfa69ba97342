"""The torch.optim face of the core: `TorchForEachOptimizer`, a `torch.optim.Optimizer` whose `step` is the core's.

torch's `Optimizer` keeps the param groups (dicts with torch's hyper names), the per-param state and the
hooks that LR schedulers, `GradScaler` and checkpointing rely on; the core (`core/`) steps them. What this
face adds: each optimizer's translation from torch's names to the core's (fastai's vocabulary), the checks
of torch's hypers, the options it does not do refused by name, per-param weight-decay exclusion inside a
group (`no_wd`), and state dicts in torch's format and key names, checked before anything is loaded.
"""
from __future__ import annotations

from numbers import Real
from typing import Callable

import torch

from ..core import Core
from ..core.state import FLAGS
from ..lowbit import CODES, SCALE
from ..core.engine import routes_of
from ..rules import AT_LEAST_ZERO, CLOSED_FRACTION, FRACTION, Check

__all__ = ['TorchForEachOptimizer', 'GradientRelease', 'bias_and_norm', 'FLAGS']

def _renamed(key: str, names: dict) -> str | None:
    "`key` as `names` names it (None: left out), the suffix of state kept in few bits (`_codes`, `_scale`) kept."
    for suffix in (CODES, SCALE):
        base = key.removesuffix(suffix)
        if base != key and base in names: return None if names[base] is None else names[base] + suffix
    return names.get(key, key)


def bias_and_norm(name: str | None, p: torch.Tensor) -> bool:
    "The params fastai's Learner exempts from weight decay: biases and norm weights (tensors of one dimension)."
    return p.ndim <= 1


def _tuple_of(check: Check) -> Callable:
    "A tuple (or list) of numbers, each passing `check` (how many: see `TorchForEachOptimizer.names`)."
    def run(name, value, where):
        if not isinstance(value, (tuple, list)) or not value:
            raise ValueError(f"Invalid {name}{where}: {value!r} (must be a tuple of numbers {check.expected})")
        for v in value: check(name, v, where)
    return run


def _float(check: Check) -> Callable:
    "`check` for a Python number: a tensor is refused (the face takes plain numbers)."
    def run(name, value, where):
        if isinstance(value, torch.Tensor):
            raise ValueError(f"Invalid {name}{where}: a Tensor (fastforeach's torch face takes a Python float)")
        check(name, value, where)
    return run


def _flag(name, value, where):
    if not isinstance(value, bool): raise ValueError(f"Invalid {name}{where}: {value!r} (must be True or False)")


# torch's hyper names and their checks, shared by the optimizers that take them.
def _lr(name, value, where):
    "A number, or a tensor of one element (as torch's compiled loops keep it), that is >= 0."
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"Invalid {name}{where}: a Tensor of {value.numel()} elements (must be one number)")
    AT_LEAST_ZERO(name, value, where)


CHECKS = {'lr': _lr, 'eps': _float(AT_LEAST_ZERO), 'weight_decay': _float(AT_LEAST_ZERO),
          'momentum': _float(AT_LEAST_ZERO), 'dampening': _float(Check(lambda v: True, '')), 'betas': _tuple_of(FRACTION),
          'nus': _tuple_of(CLOSED_FRACTION), 'nesterov': _flag}


class TorchForEachOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` stepped by the core (see `core/`): torch's param groups, hyper names,
    defaults and state dicts outside; a step rule over whole lists of tensors inside.

    `decoupled_weight_decay`, when given, says whether weight decay is decoupled (p ← p·(1 − lr·wd)) or L2
    (g ← g + wd·p), one choice for every group (else the class's `decouple_wd`).

    A subclass declares `defaults` (torch's names); `names`: each torch hyper's name in the core (fastai's
    vocabulary; a tuple for a tuple of hypers, as `betas` -> `mom`, `sqr_mom`), which `hypers(group)`
    translates by; `rules`: the foreach rule and its fused form (or `Routed` steps), which `rule(groups,
    fused)` picks from; `checks`: its own checks of hypers whose shared check (`CHECKS`) does not fit;
    `state_names`: the core's state key -> torch's (None: not saved); `refused`: torch's options the face
    does not do, with the only value each may take.

    `no_wd(name, param)`: params for which it is true take no weight decay, inside any group (`name` is
    the param's name where `params` came from `named_parameters()`, else None; `bias_and_norm` is what
    fastai's Learner does). `foreach`/`fused`: the foreach rule or its fused form; both None: fused where
    every param is on CUDA, foreach elsewhere (on CPU the first fused step compiles for seconds).
    16-bit params are written back with `rounding` ('kahan', 'master24', 'stochastic' or 'nearest'; see `precision.py`)."""
    names: dict[str, str | tuple[str, ...]] = {}
    rules: tuple = ()
    state_names: dict[str, str | None] = {}
    refused: dict[str, object] = {}
    checks: dict[str, Callable] = {}  # its own checks of torch's hypers, in place of the shared ones (`CHECKS`)
    decouple_wd: bool = False

    def __init__(self, params, defaults: dict, *, foreach: bool | None = None, fused: bool | None = None,
                 no_wd: Callable | None = None, rounding: str = 'kahan', kahan_dtype: torch.dtype = torch.float32,
                 decoupled_weight_decay: bool | None = None, state_format=None):
        if decoupled_weight_decay is not None:
            _flag('decoupled_weight_decay', decoupled_weight_decay, '')
            self.decouple_wd = decoupled_weight_decay
        if foreach and fused: raise ValueError("Invalid foreach and fused: both True (choose one)")
        if foreach is False and not fused:
            raise ValueError("Invalid foreach: False (fastforeach steps whole lists of tensors and has no per-tensor "
                             "loop; leave it None, or use torch.optim's own optimizer)")
        self.no_wd, self.core, self._exempt = no_wd, None, []
        super().__init__(params, defaults)  # each group through `add_param_group`: checked, its exemptions noted
        every = [p for g in self.param_groups for p in g['params']]
        self.fused = bool(fused) if fused is not None or foreach else all(p.device.type == 'cuda' for p in every)
        self.core = Core(self.rule(self.param_groups, self.fused), self.decouple_wd, rounding, kahan_dtype,
                         l2_into_grads=False, state_format=state_format)
        self.core.hold(every)

    rounding = property(lambda self: self.core.rounding, doc="How 16-bit params are written back (see `precision.py`).")

    # --- what each optimizer declares ------------------------------------------------------------------
    def hypers(self, group: dict) -> dict:
        """The core's hypers for `group`, named as `names` says. A tensor lr is read as a number (`.item()`:
        on CUDA the host waits for the device there), since the core's steps take their lr on the host."""
        out = {}
        for name, core in self.names.items():
            if isinstance(core, tuple): out.update(zip(core, group[name]))
            else: out[core] = group[name]
        if isinstance(out.get('lr'), torch.Tensor): out['lr'] = out['lr'].item()
        return out

    def rule(self, groups: list[dict], fused: bool) -> Callable:
        "The core's step rule (or its fused form) for these groups."
        return self.rules[1] if fused else self.rules[0]

    # --- groups --------------------------------------------------------------------------------------
    def check_group(self, group: dict, where: str = '') -> None:
        "Raise `ValueError` naming the hyper and value of `group` (torch's names) that this optimizer refuses."
        for name, value in group.items():
            check = self.checks.get(name, CHECKS.get(name))
            if check is not None: check(name, value, where)
            core = self.names.get(name)
            if isinstance(core, tuple) and (not isinstance(value, (tuple, list)) or len(value) != len(core)):
                raise ValueError(f"Invalid {name}{where}: {value!r} (must be {len(core)} numbers: {', '.join(core)})")
            if name == 'decoupled_weight_decay' and value != self.decouple_wd:
                raise ValueError(f"Invalid {name}{where}: {value!r} (this optimizer's groups all take "
                                 f"{self.decouple_wd}: it is one way of weight decay for every group)")
            if name in self.refused and value != self.refused[name]:
                raise ValueError(f"Invalid {name}{where}: {value!r} (fastforeach's {type(self).__name__} does not "
                                 f"do it: only {self.refused[name]!r})")

    def add_param_group(self, param_group: dict) -> None:
        "torch's `add_param_group`, checked before anything changes; its params marked as `no_wd` says."
        filled = {**self.defaults, **{k: v for k, v in param_group.items() if k not in ('params', 'param_names')}}
        self.check_group(filled, f" for param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.no_wd is not None:
            names = group.get('param_names', [None] * len(group['params']))
            self._exempt += [p for name, p in zip(names, group['params']) if self.no_wd(name, p)]
            self._marked = False
        if self.core is not None:  # a group added after construction
            rule = self.rule(self.param_groups, self.fused)
            if routes_of(rule)[0].rule.fn is not self.core.rule.fn: self.core.routes = routes_of(rule)
            self.core.hold([p for g in self.param_groups for p in g['params']])

    # --- step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        "One step of every param with a gradient; `closure`, when given, recomputes the loss first (and is returned)."
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        self._step_all()
        return loss

    def _step_all(self, only: set | None = None) -> None:
        "The core's step of every param with a gradient (whose id is in `only`, if given), every group checked first."
        for i, group in enumerate(self.param_groups): self.check_group(group, self._where(i))
        hypers = [self.hypers(group) for group in self.param_groups]
        self._mark_exempt()
        self.core.step(zip(hypers, [group['params'] for group in self.param_groups]), self.state, only)

    def _mark_exempt(self):
        """The `do_wd=False` flags of the params `no_wd` exempts, in their state (where the core reads them),
        set at the first step rather than at construction: until a step, `state` stays empty, as
        torch.distributed.checkpoint expects of an optimizer that has not stepped (it then steps it once,
        with lr 0, to create the state it loads into)."""
        if getattr(self, '_marked', True): return
        for p in self._exempt: self.state[p]['do_wd'] = False
        self._marked = True

    @torch.no_grad()
    def step_params(self, params) -> None:
        "A step of only `params` (those of them with a gradient): one bucket of a gradient release (see `GradientRelease`)."
        self._step_all({id(p) for p in params})

    def _where(self, i: int) -> str: return f" for param group {i}" if len(self.param_groups) > 1 else ''

    # --- state dicts ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        "torch's format and key names: state by param index (params that never stepped left out), then the groups."
        sd = super().state_dict()
        state = {}
        for i, s in sd['state'].items():
            out = {}
            for key, value in s.items():
                name = _renamed(key, self.state_names)
                if key in FLAGS or name is None: continue
                out[name] = torch.tensor(float(value)) if key == 'step' else value
            if out: state[i] = out
        return {'state': state, 'param_groups': sd['param_groups']}

    def fastai_state_dict(self) -> dict:
        """This optimizer's state dict in the fastai face's format (per-param state in param order, hypers in
        fastai's names): what the fastai face's optimizer of the same rule loads (`load_state_dict` here
        takes that format too)."""
        params = [p for group in self.param_groups for p in group['params']]
        return {'state': [self.core.plain_state(p, self.state[p]) if p in self.state else {} for p in params],
                'hypers': [self.hypers(group) for group in self.param_groups]}

    def _from_fastai(self, sd: dict) -> dict:
        "A fastai-face state dict (see `fastai_state_dict`) in torch's format, this optimizer's groups with its hypers."
        n_params = sum(len(g['params']) for g in self.param_groups)
        if len(sd['state']) != n_params:
            raise ValueError(f"Invalid state dict: {len(sd['state'])} params, the optimizer has {n_params}")
        groups, at = [], 0
        for i, (group, hyper) in enumerate(zip(self.param_groups, sd['hypers'])):
            saved = {k: v for k, v in group.items() if k != 'params'}
            for name, core in self.names.items():
                missing = [c for c in (core if isinstance(core, tuple) else (core,)) if c not in hyper]
                if missing: raise ValueError(f"Invalid state dict: param group {i} lacks hypers {missing}")
                saved[name] = tuple(hyper[c] for c in core) if isinstance(core, tuple) else hyper[core]
            groups.append({**saved, 'params': list(range(at, at + len(group['params'])))})
            at += len(group['params'])
        to_torch = {k: v for k, v in self.state_names.items() if v is not None}
        state = {i: {_renamed(k, to_torch): v for k, v in s.items() if k not in FLAGS}
                 for i, s in enumerate(sd['state']) if isinstance(s, dict) and any(k not in FLAGS for k in s)}
        return {'state': state, 'param_groups': groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in torch's format: this face's, or torch.optim's own optimizer's of the same math
        (its key names); or one of the fastai face's optimizer of the same rule (see `fastai_state_dict`).
        Checked whole first (groups, hypers, each param's state), nothing changed if it fails."""
        if isinstance(state_dict, dict) and 'hypers' in state_dict and isinstance(state_dict.get('state'), list):
            state_dict = self._from_fastai(state_dict)
        internal = self._checked(state_dict)
        super().load_state_dict(internal)
        # torch casts every state tensor to its param's dtype (codes of state in few bits too): each param's
        # saved state is taken again as the core takes it (see `core.state.load_param_state`).
        ids = [i for got in internal['param_groups'] for i in got['params']]
        for i, p in zip(ids, (p for group in self.param_groups for p in group['params'])):
            if i in internal['state']: self.state[p] = self.core.load_state(p, internal['state'][i])
        self._marked = False  # the exemptions, marked again at the next step

    def _checked(self, sd) -> dict:
        "`sd` with the core's state keys, after checking that it fits; `ValueError` naming what does not."
        if not isinstance(sd, dict) or 'state' not in sd or 'param_groups' not in sd:
            raise ValueError("Invalid state dict: expected a dict with 'state' and 'param_groups' (torch.optim's format)")
        groups, saved = self.param_groups, sd['param_groups']
        if len(saved) != len(groups):
            raise ValueError(f"Invalid state dict: {len(saved)} param groups, the optimizer has {len(groups)}")
        for i, (group, got) in enumerate(zip(groups, saved)):
            if len(got['params']) != len(group['params']):
                raise ValueError(f"Invalid state dict: param group {i} has {len(got['params'])} params, the "
                                 f"optimizer's has {len(group['params'])}")
            self.check_group({k: v for k, v in got.items() if k not in ('params', 'param_names')},
                             f" in the state dict's param group {i}")
        to_core = {name: key for key, name in self.state_names.items() if name is not None}
        states, by_id = {}, {}
        for group, got in zip(groups, saved): by_id.update(zip(got['params'], group['params']))
        for i, s in sd['state'].items():
            if i not in by_id: raise ValueError(f"Invalid state dict: state for param {i!r}, which no param group holds")
            if not isinstance(s, dict): raise ValueError(f"Invalid state dict: param {i}: state is not a dict")
            states[i] = self.imported({_renamed(k, to_core): v for k, v in s.items() if v is not None}, i)
        ordered = [states.get(i, {}) for got in saved for i in got['params']]
        try:
            self.core.check_state([g['params'] for g in groups], ordered,
                                  [self.hypers({**self.defaults, **got}) for got in saved])
        except ValueError as e:
            message = str(e)
            for key, name in self.state_names.items():
                if name is not None: message = message.replace(repr(key), repr(name))
            raise ValueError(message) from None
        return {'state': states, 'param_groups': saved}

    def imported(self, state: dict, i) -> dict:
        "A saved param's state with the core's keys, made what the core keeps: the step count an int."
        step = state.get('step')
        if isinstance(step, torch.Tensor) and step.numel() == 1: step = step.item()
        if isinstance(step, Real) and not isinstance(step, bool) and float(step).is_integer():
            state['step'] = int(step)
        return state


class GradientRelease:
    """Gradient release for a plain loop: `opt`'s params stepped during backward, each bucket of about
    `bucket_bytes` as soon as backward has completed its gradients, which are then freed (see
    `releasing.py`); the params end where `opt.step()` would take them. Run each backward inside it, in
    place of `opt.step()` and `opt.zero_grad()`; `remove()` its hooks when done:

        release = GradientRelease(opt)
        for x, y in batches:
            with release: loss_fn(model(x), y).backward()

    Gradients are gone when `step()` would run: clipping by their total norm and `GradScaler` (which
    unscales and checks every gradient first) cannot be used with it."""
    def __init__(self, opt: TorchForEachOptimizer, bucket_bytes: int = 25 << 20):
        if not isinstance(opt, TorchForEachOptimizer):
            raise ValueError(f"GradientRelease needs a fastforeach.optim optimizer, not {type(opt).__name__}: it steps "
                             "buckets of params during backward")
        from ..releasing import Release
        self.release = Release([p for g in opt.param_groups for p in g['params']], opt.step_params, bucket_bytes)
        self.release.attach()

    def __enter__(self):
        self.release.begin()
        return self

    def __exit__(self, kind, *_):
        if kind is None: self.release.end()
        else: self.release.active = False  # backward failed: nothing more is stepped

    def remove(self) -> None:
        "Take the hooks off the params: later backward passes keep their gradients for `opt.step()`."
        self.release.detach()
