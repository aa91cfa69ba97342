"""fastforeach's optimizers as `torch.optim.Optimizer`s, for plain PyTorch, Hugging Face, Lightning and
accelerate: torch's names, defaults, param groups and state dicts, over the same core as the fastai face.

    from fastforeach.optim import AdamW, bias_and_norm
    opt = AdamW(model.named_parameters(), lr=1e-3, no_wd=bias_and_norm)
"""
from .base import TorchForEachOptimizer, bias_and_norm
from .optimizers import SGD, TORCH_EQUIVALENTS, Adam, AdamW

__all__ = ['TorchForEachOptimizer', 'bias_and_norm', 'Adam', 'AdamW', 'SGD', 'TORCH_EQUIVALENTS']
