"One module per optimizer: its foreach step rules and its `ForEachOptimizer` class."
from .adam import AdamForEachOptimizer
from .lamb import LambForEachOptimizer
from .larc import LarcForEachOptimizer
from .qhadam import QHAdamForEachOptimizer
from .radam import RAdamForEachOptimizer
from .rmsprop import RMSPropForEachOptimizer
from .sgd import SGDForEachOptimizer

__all__ = ['SGDForEachOptimizer', 'RMSPropForEachOptimizer', 'AdamForEachOptimizer', 'RAdamForEachOptimizer',
           'QHAdamForEachOptimizer', 'LarcForEachOptimizer', 'LambForEachOptimizer']
