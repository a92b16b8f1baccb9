"""The contenders, one per process: `python bench/peers.py NAME [args]` prints one RESULT line.

Overhead job (Linear(2, 1), 64k samples, batch 64, 3 epochs, Adam 1e-2, MSE, one CPU process):
  limit        a loop indexing in-memory tensors with a shuffled index, no per-sample loader
  dataloader   the hand-written loop: DataLoader(TensorDataset, shuffle) + loss tracking (loss.item())
  launcher     launcher.Trainer(...).fit with its defaults (progress bar, loss tracking, checkpoints)
  lightning    lightning.Trainer with its defaults (progress bar, logger, checkpointing), self.log(loss)
  torchkeras   torchkeras.KerasModel(...).fit with its defaults
MNIST (the CNN of launcher/recipes/mnist.py, fp32, Adam 1e-3, batch 128, one epoch or MAX_STEPS; the
launcher side is `python -m launcher recipe=mnist`; clocked from outside, see common.timed_command):
  raw-mnist [MAX_STEPS VAL_LIMIT]                   under torchrun: DDP, gloo
  lightning-mnist [DEVICES MAX_STEPS VAL_LIMIT]
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import MNIST, Timed, emit, linreg_data

EPOCHS, BATCH = 3, 64
MNIST_BATCH = 128


def _model():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    return Timed(torch.nn.Linear(2, 1))


def limit() -> None:
    import torch

    x, y = linreg_data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    emit(steps_per_s=model.steps_per_s(), steps=model.n)


def dataloader() -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = linreg_data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.MSELoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    for epoch in range(EPOCHS):
        total, n = 0.0, 0
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(xb), n + len(xb)
        print(f"epoch {epoch + 1}: loss {total / n:.4f}", file=sys.stderr)
    emit(steps_per_s=model.steps_per_s(), steps=model.n)


def launcher(callbacks: str = "0") -> None:
    import torch
    from torch.utils.data import TensorDataset

    from launcher import Trainer

    x, y = linreg_data()
    model = _model()
    extra = {"callbacks": _no_ops(int(callbacks))} if int(callbacks) else {}  # (a launcher before callbacks runs too)
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(max_epochs=EPOCHS, batch_size=BATCH, monitor="train_loss", run_dir=f"{tmp}/run").fit(
            model, torch.nn.MSELoss(), torch.optim.Adam(model.parameters(), lr=1e-2), TensorDataset(x, y), **extra)
    emit(steps_per_s=model.steps_per_s(), steps=model.n)


def _no_ops(n: int) -> list:
    import launcher as L

    class NoOp(L.Callback):  # every training hook overridden, so each is called (an unused hook costs nothing)
        def on_step_end(self, run): pass  # noqa: E704
        def on_validation_end(self, run, metrics): pass  # noqa: E704
        def on_epoch_end(self, run, row): pass  # noqa: E704
        def on_checkpoint(self, run, path): pass  # noqa: E704

    return [NoOp() for _ in range(n)]


def launcher_callbacks() -> None:
    launcher("10")


def _lit_module(net, lr: float, loss_fn, log_every_step: bool = True):  # type: ignore[no-untyped-def]
    import lightning as L
    import torch

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = loss_fn(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            out = self.net(x)
            self.log("val_loss", loss_fn(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=lr)

    return Lit()


def lightning() -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = linreg_data()
    model = _model()
    with tempfile.TemporaryDirectory() as tmp:
        L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, default_root_dir=tmp).fit(
            _lit_module(model, 1e-2, torch.nn.MSELoss()),
            DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True))
    emit(steps_per_s=model.steps_per_s(), steps=model.n)


def torchkeras() -> None:
    import torch
    import torchkeras as tk
    from torch.utils.data import DataLoader, TensorDataset

    x, y = linreg_data()
    model = _model()
    km = tk.KerasModel(model, loss_fn=torch.nn.MSELoss(), optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with tempfile.TemporaryDirectory() as tmp:
        km.fit(train_data=loader, val_data=None, epochs=EPOCHS, ckpt_path=f"{tmp}/ckpt.pt", monitor="train_loss",
               mode="min", plot=False)
    emit(steps_per_s=model.steps_per_s(), steps=model.n)


def _mnist(val_limit: str):  # type: ignore[no-untyped-def]
    from launcher.recipes import mnist

    return mnist.datasets(MNIST, download=False, val_limit=int(val_limit))


def raw_mnist(max_steps: str = "-1", val_limit: str = "0") -> None:
    """What one writes by hand: DataLoader batches, the step, then accuracy on the test set. Under
    torchrun (WORLD_SIZE > 1): DDP over gloo with a DistributedSampler; rank 0 evaluates."""
    import os

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.recipes import mnist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = mnist.Net()
    train, val = _mnist(val_limit)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    sampler = DistributedSampler(train, seed=0) if world > 1 else None
    loader = DataLoader(train, batch_size=MNIST_BATCH, shuffle=sampler is None, sampler=sampler)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for step, (x, y) in enumerate(loader, 1):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == int(max_steps):
            break
    if not world > 1 or dist.get_rank() == 0:
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in DataLoader(val, batch_size=MNIST_BATCH):
                correct += (net(x).argmax(1) == y).sum().item()
        emit(val_acc=correct / len(val), val_end_unix=time.time())
    if world > 1:
        dist.destroy_process_group()


def lightning_mnist(devices: str = "1", max_steps: str = "-1", val_limit: str = "0") -> None:
    """Lightning's Trainer with its defaults (progress bar, logger, checkpoint, summary, sanity check),
    fp32; with devices > 1 its own DDP on CPU (it starts the other ranks)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from launcher.recipes import mnist

    class ValEnd(L.Callback):
        """When the last validation ended (what follows it: checkpoint, teardown, exit)."""

        at = 0.0

        def on_validation_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            ValEnd.at = time.time()

    torch.manual_seed(0)
    train, val = _mnist(val_limit)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_epochs=1, max_steps=int(max_steps), accelerator="cpu", devices=int(devices),
                            default_root_dir=tmp, callbacks=[ValEnd()])
        trainer.fit(_lit_module(mnist.Net(), 1e-3, torch.nn.CrossEntropyLoss()),
                    DataLoader(train, batch_size=MNIST_BATCH, shuffle=True), DataLoader(val, batch_size=MNIST_BATCH))
        if trainer.global_rank == 0 and "val_acc" in trainer.callback_metrics:
            emit(val_acc=float(trainer.callback_metrics["val_acc"]), val_end_unix=ValEnd.at)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    globals()[name.replace("-", "_")](*args)
