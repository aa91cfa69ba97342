"""The Learner side of schedule-free optimizers (see `optimizers/schedulefree.py`)."""
import torch
from fastai.callback.core import Callback
from torch import nn

from ..core import inner_optimizer
from ..optimizers.schedulefree import ScheduleFreeModes
from ..rules import check_int

__all__ = ['ScheduleFree']


class ScheduleFree(Callback):
    """The Learner side of schedule-free optimizers: train mode (params at y) for training, eval mode (params
    at x) for validation and after fit, so that `validate`, `predict`, `get_preds`, `save` and `export` see
    the averaged weights. Before each validation, BatchNorm running statistics are recomputed at x, as the
    authors advise, from `bn_batches` training batches (0: keep those gathered at y)."""
    order = 1  # after TrainEvalCallback has put the model in eval mode for validation

    def __init__(self, bn_batches: int = 16):
        check_int('bn_batches', bn_batches, 0)
        self.bn_batches = bn_batches

    def before_fit(self):
        inner = inner_optimizer(self.opt)
        if not isinstance(inner, ScheduleFreeModes):
            raise ValueError(f"ScheduleFree needs a schedule-free optimizer (opt_func=ScheduleFreeAdam), "
                             f"not {type(inner).__name__}")

    def before_train(self): self.opt.train()

    def before_validate(self):
        self.opt.eval()
        if self.bn_batches: self._recompute_batch_norm()

    def after_fit(self): self.opt.eval()
    def after_cancel_fit(self): self.opt.eval()

    @torch.no_grad()
    def _recompute_batch_norm(self):
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms: return
        momenta = [m.momentum for m in norms]
        for m in norms: m.reset_running_stats(); m.momentum = None  # a plain average over the batches below
        self.model.train()
        for i, (xb, *_) in enumerate(self.dls.train):
            if i == self.bn_batches: break
            self.model(xb)
        self.model.eval()
        for m, momentum in zip(norms, momenta): m.momentum = momentum
