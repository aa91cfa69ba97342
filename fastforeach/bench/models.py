"""The benchmark's models: fastai's xresnets, a small transformer and a deep MLP of small tensors."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ['MODELS', 'QUICK_MODELS', 'mlp', 'transformer', 'example_input', 'params_like']


def mlp(depth=100, width=64) -> nn.Module:
    "The 100-layer, 64-wide MLP: 200 small tensors."
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


def transformer() -> nn.Module:
    "A small transformer encoder: 4 layers, width 256."
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


def _xresnet(name):
    def build():
        from fastai.vision.models import xresnet
        return getattr(xresnet, name)()
    build.__doc__ = f"fastai's {name}"
    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    'xresnet18': _xresnet('xresnet18'), 'xresnet50': _xresnet('xresnet50'), 'transformer': transformer, 'mlp': mlp}
QUICK_MODELS = ['mlp', 'xresnet18']


def example_input(model: str, device='cpu') -> torch.Tensor:
    "A small batch each benchmark model takes."
    gen = torch.Generator().manual_seed(0)
    shape = {'mlp': (8, 64), 'transformer': (2, 16, 256)}.get(model, (2, 3, 64, 64))
    return torch.randn(shape, generator=gen).to(device)


def params_like(model: nn.Module, device) -> list[nn.Parameter]:
    "Fresh params, copies of `model`'s, on `device`."
    return [nn.Parameter(p.detach().clone().to(device)) for p in model.parameters()]
