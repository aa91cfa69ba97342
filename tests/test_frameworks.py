"""The torch face (`fastforeach.optim`) in the frameworks that take a `torch.optim.Optimizer`: Hugging Face's
`Trainer`, Lightning's `configure_optimizers` and accelerate's `prepare`, each run beside the same training
with torch.optim.AdamW (float32, the same seeds and batches), skipped with a reason where a framework does
not install."""
import tempfile

import pytest
import torch
from torch import nn

from fastforeach.optim import AdamW

TOL = 1e-6  # float32: the face's foreach lists and torch's per-tensor loop round in different orders


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))


def data(n=32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=gen), torch.randn(n, generator=gen)


def assert_same(a, b):
    for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=TOL, atol=TOL)


def test_hugging_face_trainer():
    "`Trainer(optimizers=(opt, scheduler))` trains with the face's AdamW as with torch's (gradient clipping on)."
    transformers = pytest.importorskip('transformers', reason="Hugging Face transformers is not installed")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny()
        def forward(self, x, labels=None):
            return {'loss': nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}

    xs, ys = data()
    dataset = [{'x': x, 'labels': y} for x, y in zip(xs, ys)]

    def train(make_opt):
        model = Model()
        opt = make_opt(model.parameters())
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=8,
                                                  report_to=[], use_cpu=True, save_strategy='no', logging_strategy='no',
                                                  disable_tqdm=True, seed=0, data_seed=0)
            transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched)).train()
        return [p.detach() for p in model.parameters()], opt

    ours, opt = train(lambda ps: AdamW(ps, lr=1e-2))
    theirs, _ = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert_same(ours, theirs)
    assert opt.state_dict()['state'][0]['step'] == 6


def test_lightning_configure_optimizers():
    "A LightningModule whose `configure_optimizers` returns the face's AdamW and a scheduler trains as with torch's."
    lightning = pytest.importorskip('lightning', reason="Lightning is not installed")

    class Module(lightning.LightningModule):
        def __init__(self, make_opt):
            super().__init__()
            self.net, self.make_opt = tiny(), make_opt
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        def configure_optimizers(self):
            opt = self.make_opt(self.parameters())
            return {'optimizer': opt, 'lr_scheduler': torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    def train(make_opt):
        module = Module(make_opt)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=8)
        lightning.Trainer(max_steps=6, accelerator='cpu', logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
        return [p.detach() for p in module.parameters()]

    assert_same(train(lambda ps: AdamW(ps, lr=1e-2)), train(lambda ps: torch.optim.AdamW(ps, lr=1e-2)))


def test_accelerate_prepare():
    "accelerate's `prepare` wraps the face's AdamW as it wraps torch's, and the loop trains alike."
    accelerate = pytest.importorskip('accelerate', reason="accelerate is not installed")

    def train(make_opt):
        model = tiny()
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, make_opt(model.parameters()))
        xs, ys = data(40)
        for x, y in zip(xs.split(8), ys.split(8)):
            accelerator.backward(nn.functional.mse_loss(model(x).squeeze(-1), y))
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt

    ours, opt = train(lambda ps: AdamW(ps, lr=1e-2))
    theirs, _ = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert_same(ours, theirs)
    assert type(opt).__name__ == 'AcceleratedOptimizer' and isinstance(opt.optimizer, AdamW)
