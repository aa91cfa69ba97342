"""What the registry's rows can do, read off the optimizers they build: the tests and the benchmark ask this
instead of keeping lists of names."""
from __future__ import annotations

import torch
from torch import nn

from ..core import inner_optimizer
from ..fused import CompiledStep
from ..registry import REGISTRY

__all__ = ['compiled_optimizers']


def compiled_optimizers(names=None) -> list[str]:
    "Those of `names` (default: every registry row) whose fused step is compiled (the others use kernels PyTorch ships)."
    names = list(REGISTRY) if names is None else names
    opts = {name: REGISTRY[name].make('fused', [nn.Parameter(torch.zeros(2))]) for name in names}
    return [name for name, opt in opts.items() if isinstance(inner_optimizer(opt).fused, CompiledStep)]
