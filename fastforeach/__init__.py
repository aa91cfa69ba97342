"""fastforeach: fastai's optimizers done over whole lists of tensors at once.

`from fastforeach import *` replaces `from fastai.optimizer import *`: the factories keep fastai's names,
signatures and defaults and add keyword-only `foreach` (True: fastforeach, False: fastai's own) and
`fused` (True: one pass over memory per step) switches.
"""
from .engine import ForEachOptimizer
from .lookahead import Lookahead, RangerForEachOptimizer
from .optimizers import *
from .optimizers import __all__ as _optimizer_classes
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

__all__ = ['ForEachOptimizer', 'SGD', 'RMSProp', 'Adam', 'RAdam', 'QHAdam', 'Larc', 'Lamb', 'Lookahead', 'ranger',
           'RangerForEachOptimizer', *_optimizer_classes]
