"""fastai callbacks: gradient release and optimizer accumulation, pure bf16 training, schedule-free modes."""
from .pure_bf16 import PureBF16
from .release import GradientRelease, OptimizerAccumulation
from .schedulefree import ScheduleFree

__all__ = ['GradientRelease', 'OptimizerAccumulation', 'PureBF16', 'ScheduleFree']
