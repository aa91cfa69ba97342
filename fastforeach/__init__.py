"""fastforeach: fastai's optimizers done over whole lists of tensors at once.

`from fastforeach import *` replaces `from fastai.optimizer import *`: it gives every public name of
`fastai.optimizer` (`Optimizer`, `OptimWrapper`, the steppers such as `sgd_step` and `weight_decay`), with
fastforeach's factories in place of fastai's. They keep fastai's names, signatures and defaults and add
keyword-only `foreach` (True: fastforeach, False: fastai's own) and `fused` (True: one pass over memory
per step) switches.
"""
import fastai.optimizer as _fastai_optimizer
from fastai.optimizer import *  # noqa: F403 - fastai's public names; fastforeach's own below take precedence

from .engine import ForEachOptimizer
from .lookahead import Lookahead, RangerForEachOptimizer
from .optimizers import *  # noqa: F403
from .optimizers import __all__ as _optimizer_classes
from .optimizers.schedulefree import ScheduleFree
from .pure_bf16 import PureBF16
from .release import GradientRelease, OptimizerAccumulation
from .registry import REGISTRY, make_factory

__version__ = '0.1.0'

SGD = make_factory(REGISTRY['SGD'])
RMSProp = make_factory(REGISTRY['RMSProp'])
Adam = make_factory(REGISTRY['Adam'])
RAdam = make_factory(REGISTRY['RAdam'])
QHAdam = make_factory(REGISTRY['QHAdam'])
Larc = make_factory(REGISTRY['Larc'])
Lamb = make_factory(REGISTRY['Lamb'])
ranger = make_factory(REGISTRY['ranger'])
Lion = make_factory(REGISTRY['Lion'])
Adan = make_factory(REGISTRY['Adan'])
StableAdam = make_factory(REGISTRY['StableAdam'])
ScheduleFreeAdam = make_factory(REGISTRY['ScheduleFreeAdam'])
Muon = make_factory(REGISTRY['Muon'])

# fastforeach's replacements of fastai's names; every other name of fastai's `__all__` is fastai's own object.
OWN = ('SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb', 'Lookahead', 'ranger')
# Optimizers fastai does not have, with fastai's vocabulary.
MODERN = ('Lion', 'Adan', 'StableAdam', 'ScheduleFreeAdam', 'Muon')

__all__ = list(dict.fromkeys([*_fastai_optimizer.__all__, *OWN, *MODERN, 'ForEachOptimizer', 'RangerForEachOptimizer',
                              *_optimizer_classes, 'PureBF16', 'GradientRelease', 'OptimizerAccumulation', 'ScheduleFree']))
