"One module per optimizer: its foreach step rules and its `ForEachOptimizer` class."
from .adam import AdamForEachOptimizer
from .adan import AdanForEachOptimizer
from .lamb import LambForEachOptimizer
from .larc import LarcForEachOptimizer
from .lion import LionForEachOptimizer
from .muon import MuonForEachOptimizer
from .qhadam import QHAdamForEachOptimizer
from .radam import RAdamForEachOptimizer
from .rmsprop import RMSPropForEachOptimizer
from .schedulefree import ScheduleFreeAdamForEachOptimizer
from .sgd import SGDForEachOptimizer
from .stableadam import StableAdamForEachOptimizer

__all__ = ['SGDForEachOptimizer', 'RMSPropForEachOptimizer', 'AdamForEachOptimizer', 'RAdamForEachOptimizer',
           'QHAdamForEachOptimizer', 'LarcForEachOptimizer', 'LambForEachOptimizer', 'LionForEachOptimizer',
           'AdanForEachOptimizer', 'StableAdamForEachOptimizer', 'ScheduleFreeAdamForEachOptimizer',
           'MuonForEachOptimizer']
