"""fastforeach's optimizers as `torch.optim.Optimizer`s, for plain PyTorch, Hugging Face, Lightning and
accelerate: torch's names, defaults, param groups and state dicts, over the same core as the fastai face.

    from fastforeach.optim import AdamW, bias_and_norm
    opt = AdamW(model.named_parameters(), lr=1e-3, no_wd=bias_and_norm)
"""
from .base import GradientRelease, TorchForEachOptimizer, bias_and_norm
from .lookahead import Lookahead
from .modern import FASTAI_EQUIVALENTS, REFERENCE_EQUIVALENTS, Adan, Lamb, LARS, Larc, Lion, QHAdam, ScheduleFreeAdamW, StableAdamW
from .optimizers import SGD, TORCH_EQUIVALENTS, Adafactor, Adam, AdamW, Muon, RAdam, RMSprop

__all__ = ['TorchForEachOptimizer', 'GradientRelease', 'bias_and_norm', 'Adam', 'AdamW', 'RAdam', 'SGD', 'RMSprop', 'Muon', 'Adafactor', 'Lion', 'Adan', 'StableAdamW', 'Lamb',
           'QHAdam', 'Larc', 'LARS', 'ScheduleFreeAdamW', 'Lookahead', 'TORCH_EQUIVALENTS', 'FASTAI_EQUIVALENTS', 'REFERENCE_EQUIVALENTS']
