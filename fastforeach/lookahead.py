"Lookahead, which wraps any optimizer, and ranger (RAdam inside Lookahead)."
from numbers import Integral, Real

import torch
from fastai.optimizer import Lookahead as _FastaiLookahead
from fastcore.foundation import L

from .optimizers.radam import RAdamForEachOptimizer

__all__ = ['Lookahead', 'RangerForEachOptimizer']


def check_lookahead(k, alpha) -> None:
    if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (must be an int >= 1)")
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not 0 < alpha <= 1:
        raise ValueError(f"Invalid alpha: {alpha!r} (must be a real number in (0, 1])")


class Lookahead(_FastaiLookahead):
    """fastai's `Lookahead` with foreach slow-weight updates: every `k` steps of `opt`,
    slow ← slow + alpha·(fast − slow), then fast ← slow. Wraps fastforeach and fastai optimizers alike;
    its `state_dict` has fastai's shape (`count`, `slow_weights`)."""
    def __init__(self, opt, k=6, alpha=0.5):
        check_lookahead(k, alpha)
        super().__init__(opt, k=k, alpha=alpha)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad(): loss = closure()
        check_lookahead(self.k, self.alpha)
        if self.slow_weights is None: self._copy_weights()
        self.opt.step()
        self.count += 1
        if self.count % self.k == 0:
            with torch.no_grad():
                for slow_pg, fast_pg in zip(self.slow_weights, self.param_lists):
                    slow, fast = list(slow_pg), list(fast_pg)
                    torch._foreach_lerp_(slow, fast, self.alpha)
                    torch._foreach_copy_(fast, slow)
        return loss

    def _set_hyper(self, k, v): self.opt._set_hyper(k, v)

    def load_state_dict(self, sd: dict):
        "Load a state dict saved by this Lookahead or fastai's; `sd` is left as it was."
        if not isinstance(sd, dict) or 'count' not in sd or 'slow_weights' not in sd:
            raise ValueError("Invalid state dict: a Lookahead state dict needs 'count' and 'slow_weights'")
        count, slow = sd['count'], sd['slow_weights']
        if not isinstance(count, Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(f"Invalid state dict: 'count' is {count!r}, expected an int >= 0")
        if slow is not None:
            if len(slow) != len(self.param_lists):
                raise ValueError(f"Invalid state dict: 'slow_weights' has {len(slow)} param groups, "
                                 f"the optimizer has {len(self.param_lists)}")
            for gi, (slow_pg, pg) in enumerate(zip(slow, self.param_lists)):
                if len(slow_pg) != len(pg):
                    raise ValueError(f"Invalid state dict: 'slow_weights' group {gi} has {len(slow_pg)} params, "
                                     f"the optimizer has {len(pg)}")
                for pi, (s, p) in enumerate(zip(slow_pg, pg)):
                    if not isinstance(s, torch.Tensor) or s.shape != p.shape:
                        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                        raise ValueError(f"Invalid state dict: 'slow_weights' group {gi}, param {pi} has shape "
                                         f"{got}, expected {tuple(p.shape)}")
        inner = {k: v for k, v in sd.items() if k not in ('count', 'slow_weights')}
        self.opt.load_state_dict(inner)  # checks before it changes anything
        self.count = int(count)
        self.slow_weights = None if slow is None else L(
            L(s.detach().to(device=p.device, dtype=p.dtype) for s, p in zip(slow_pg, pg))
            for slow_pg, pg in zip(slow, self.param_lists))


class RangerForEachOptimizer(Lookahead):
    "fastai's `ranger`: `RAdamForEachOptimizer` inside `Lookahead`."
    def __init__(self, params, lr, mom=0.95, wd=0.01, eps=1e-6, k=6, alpha=0.5, *, sqr_mom=0.99, beta=0.,
                 decouple_wd=True):
        check_lookahead(k, alpha)
        super().__init__(RAdamForEachOptimizer(params, lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=beta,
                                               decouple_wd=decouple_wd), k=k, alpha=alpha)
