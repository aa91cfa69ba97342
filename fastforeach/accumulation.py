"""Optimizer accumulation: micro-batches' gradients folded into the optimizer's averages, the params moved once.

Gradient accumulation sums the gradients of n micro-batches in a buffer and steps once with their mean G.
Optimizer accumulation (AdamAccumulation, arXiv 2305.19982) keeps no gradient: each micro-batch's gradient
g_i goes into the optimizer's averages at once, and only the last micro-batch moves the params, from the
averages. For an average of the gradient with decay β (and dampening d: 1 − β, or 1 for SGD's momentum):

    micro-batch 1:      m ← β·m + d·g_1 / n;      micro-batches 2..n:   m ← m + d·g_i / n

which after n micro-batches is β·m + d·G: exactly what gradient accumulation gives. An average of the
squared gradient gets the mean of the squares, Σ g_i² / n, where gradient accumulation uses the square of
the mean, G²: larger by the variance of the micro-batches' gradients, Σ (g_i − G)² / n. That is the
approximation (it makes Adam's steps a little smaller where micro-batches disagree).

A rule declares how its averages take micro-batches (`rules.declare(accumulation=Accumulation(...))`), or
why they cannot. It is defined for the rules whose move reads only their averages: SGD and RMSProp with momentum, Adam,
RAdam, LAMB (and ranger, Lookahead over these). It is refused where the move reads the gradient itself:
plain SGD and RMSProp without momentum (no average to hold it), QHAdam ((1 − ν₁)·g in its numerator),
Larc (its local lr divides by the gradient's norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ops import mul_scalar_

__all__ = ['Average', 'Accumulation', 'fold']


@dataclass(frozen=True)
class Average:
    "A state average: of the gradient (`power` 1) or its square (2), with decay the hyper `beta`, dampened or not."
    key: str
    beta: str
    dampened: bool = True
    power: int = 1


@dataclass(frozen=True)
class Accumulation:
    """What optimizer accumulation needs of a rule: its `averages`, and `move(p, *state, **hypers)`, the
    rule's step of the params from averages already up to date."""
    averages: tuple[Average, ...]
    move: Callable


def fold(accumulation: Accumulation, grads, states: dict, hypers: dict, index: int, n: int) -> None:
    "Fold the gradients of micro-batch `index` (of `n`) into the averages (`states`: state key -> tensors)."
    for avg in accumulation.averages:
        xs, beta = states[avg.key], hypers[avg.beta]
        scale = ((1 - beta) if avg.dampened else 1.) / n
        if index == 0: mul_scalar_(xs, beta)
        if avg.power == 1: torch._foreach_add_(xs, grads, alpha=scale)
        else: torch._foreach_addcmul_(xs, grads, grads, scale)
