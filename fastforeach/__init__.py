"""fastforeach: fastai's optimizers done over whole lists of tensors at once.

`from fastforeach import *` replaces `from fastai.optimizer import *`: it gives every public name of
`fastai.optimizer` (`Optimizer`, `OptimWrapper`, the steppers such as `sgd_step` and `weight_decay`), with
fastforeach's factories in place of fastai's. They keep fastai's names, signatures and defaults and add
keyword-only `foreach` (True: fastforeach, False: fastai's own) and `fused` (True: one pass over memory
per step) switches.
"""
import fastai.optimizer as _fastai_optimizer
from fastai.optimizer import *  # noqa: F403 - fastai's public names; fastforeach's own below take precedence

from .callbacks import GradientRelease, OptimizerAccumulation, PureBF16, ScheduleFree
from .fastai import ForEachOptimizer
from .lookahead import Lookahead, RangerForEachOptimizer
from .registry import REGISTRY, make_factory

__version__ = '0.2.0'

# One factory per registry row, under its name (`fastforeach.Adam`), and the classes behind them.
FACTORIES = {name: make_factory(spec) for name, spec in REGISTRY.items() if spec.factory}
CLASSES = {spec.foreach.__name__: spec.foreach for spec in REGISTRY.values() if isinstance(spec.foreach, type)}
globals().update(FACTORIES, **CLASSES)

# fastforeach's replacements of fastai's names; every other name of fastai's `__all__` is fastai's own object.
OWN = (*(n for n in FACTORIES if REGISTRY[n].in_fastai), 'Lookahead')
# Optimizers fastai does not have, with fastai's vocabulary.
MODERN = tuple(n for n in FACTORIES if not REGISTRY[n].in_fastai)

__all__ = list(dict.fromkeys([*_fastai_optimizer.__all__, *OWN, *MODERN, 'ForEachOptimizer', *CLASSES, 'PureBF16',
                              'GradientRelease', 'OptimizerAccumulation', 'ScheduleFree']))
