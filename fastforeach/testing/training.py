"""Small real training with fastai's Learner: scikit-learn's bundled digits images (no download) and a
small CNN with batch norm. Used by the Learner tests, the docs' examples and `fastforeach-bench --train`."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['digits_dls', 'digits_cnn', 'digits_mlp', 'cnn_splitter', 'digits_learner']


def digits_dls(n_train=512, n_valid=256, bs=64, shuffle=True, seed=0, device='cpu'):
    "fastai `DataLoaders` over scikit-learn's 8x8 digits images, scaled to [0, 1]."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, valid = order[:n_train], order[n_train:n_train + n_valid]
    as_list = lambda idx: list(zip(x[idx], y[idx]))
    return DataLoaders(DataLoader(as_list(train), bs=bs, shuffle=shuffle, drop_last=True, device=device, num_workers=0),
                       DataLoader(as_list(valid), bs=bs, device=device, num_workers=0), device=device)


def digits_cnn() -> nn.Sequential:
    """A body of two conv/batch-norm blocks and a linear head. No conv bias before batch norm: its gradient
    is rounding noise, which Adam-like optimizers with a small eps turn into full-size steps."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def digits_mlp(width: int = 512) -> nn.Sequential:
    """An MLP on the flattened images whose every matrix has at least 4,096 elements (64·w, w·w, w·10), so that
    state kept in few bits (`lowbit.py`) covers all of them; its biases stay in full precision."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def cnn_splitter(model):
    "Two param groups, body and head, for discriminative learning rates and freezing."
    return [list(model[:6].parameters()), list(model[6:].parameters())]


def digits_learner(opt_func, seed=0, path=None, shuffle=True, device='cpu', n_train=512, n_valid=256, bs=64, mlp=False,
                   **kwargs):
    """A seeded Learner on digits with `opt_func` (the CNN in two param groups; `mlp`: `digits_mlp` in one); the
    same seed gives the same init and data order."""
    import fastai.callback.schedule  # noqa: F401  (adds fit_one_cycle, fine_tune and lr_find to Learner)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    set_seed(seed, reproducible=True)
    dls = digits_dls(n_train=n_train, n_valid=n_valid, bs=bs, shuffle=shuffle, device=device)
    if not mlp: kwargs = {'splitter': cnn_splitter, **kwargs}
    learn = Learner(dls, digits_mlp() if mlp else digits_cnn(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func,
                    metrics=accuracy, path=path or '.', **kwargs)
    learn.model.to(device)
    return learn
