"""The coefficient vector of a compiled update, by name.

A compiled update reads its hypers from one small tensor `c` (see `fused/__init__.py`), so that a changing
lr never recompiles it. A `Coefficients` layout names its places: `ADAM.lr` is lr's index in `c`, a plain
int, fixed when the update is traced. Every update sees the whole vector, whose first two places are the
weight-decay factors the fused step fills in: `decay` (the decoupled factor 1 − lr·wd, or 1; for an update
that does its own decay, the decoupled wd itself, or 0) and `l2` (wd, or 0). Layouts that share updates
extend one another (`ADAM` extends `AVERAGING`), so a shared update reads the same names at the same places.
"""
from __future__ import annotations

__all__ = ['Coefficients', 'DECAY_FACTORS']

DECAY_FACTORS = ('decay', 'l2')


class Coefficients:
    "The names of the places of a coefficient vector, in order (see the module docstring)."
    def __init__(self, *names: str, decay: bool = True):
        self.names = (DECAY_FACTORS if decay else ()) + names
        if len(set(self.names)) < len(self.names): raise ValueError(f"Repeated coefficient names: {self.names}")
        for i, name in enumerate(self.names): setattr(self, name, i)

    def extend(self, *names: str) -> 'Coefficients':
        "A layout with this one's places first, then `names`."
        return Coefficients(*self.names, *names, decay=False)

    def __len__(self) -> int: return len(self.names)

    def __repr__(self) -> str: return f"Coefficients{self.names}"

    def values(self, named: dict) -> list:
        "The values of `named` (name -> value) for every place after the decay factors, in order."
        own = self.names[len(DECAY_FACTORS):] if self.names[:2] == DECAY_FACTORS else self.names
        if len(named) == len(own):  # at every fused step: checked by the lookup itself
            try: return [named[name] for name in own]
            except KeyError: pass
        missing, extra = set(own) - set(named), set(named) - set(own)
        raise KeyError(f"Coefficients {own}: missing {sorted(missing)}, unknown {sorted(extra)}")
