"""The contenders of bench/gpu.py, one per process: `python bench/gpu_peers.py NAME SPEC` (SPEC: the
JSON bench/gpu.py writes from the composed recipe, so every contender trains the same model, data,
optimizer, loss, batch size, precision and memory format); `launcher-cli` takes the launcher's
own command-line arguments instead. Each process times its steps with bench/gpu_clock.py.

  launcher-cli ARGS  `python -m launcher ARGS` itself, with the step clock installed first
  raw                a hand-written loop fed by a DataLoader (shuffle, pin_memory, non-blocking
                     copies), the loss summed on the device (no .item() per step)
  limit              the same loop over tensors already on the device: a randperm and one
                     index_select per batch there, nothing else between two steps
  lightning          lightning.Trainer with its defaults (progress bar, logger, checkpointing)

The loops do what the launcher does by default around the steps: validation and a checkpoint
(model + optimizer) at every epoch end and where max_steps stops the run inside an epoch.
"""

from __future__ import annotations

import importlib
import json
import math
import runpy
import sys
import tempfile
from typing import Any, Callable, Iterator

import gpu_clock
from common import REPO, emit


def _made(spec: dict[str, Any], *args: Any) -> Any:
    """`_target_(*args, **rest)`: what Hydra's instantiate does with a recipe entry, minus Hydra
    (the hand-written contenders import nothing of the launcher's machinery)."""
    module, _, name = spec["_target_"].rpartition(".")
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(device, net, train dataset, val dataset) on the host, seeded as the launcher seeds."""
    import torch

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    data = dict(spec["data"])
    if "device" in data:
        data["device"] = "cpu"  # a DataLoader reads host tensors; the limit moves them itself
    train, val = _made(data)
    net = _made(spec["model"]).to(device)
    if spec["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    if spec["compile"]:
        net.compile()  # in place, as the launcher does: the same graphs, so the same cache entries
    return device, net, train, val


def _autocast(spec: dict[str, Any], device: Any) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed")


def _loop(spec: dict[str, Any], epoch_batches: Callable[[int], Iterator], val_batches: Callable[[], Iterator],
          device: Any, net: Any) -> None:
    import torch

    opt = _made(spec["optimizer"], net.parameters())
    loss_fn = _made(spec["loss"])
    params = [p for p in net.parameters() if p.requires_grad]
    steps, clip, cl = spec["steps"], spec["gradient_clip_val"], spec["channels_last"]
    step, result = 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(spec["max_epochs"]):
            net.train()
            loss_sum = torch.zeros((), device=device)
            for x, y in epoch_batches(epoch):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(spec, device):
                    loss = loss_fn(net(x), y)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                step += 1
                if step == steps:
                    break
            result = _validate(spec, net, loss_fn, val_batches, device)
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, f"{tmp}/checkpoint.pt")
            print(f"epoch {epoch + 1}: train loss {float(loss_sum) / max(step, 1):.4f}, {result}", file=sys.stderr)
            if step == steps:
                break
    emit(**result, steps=step)


def _validate(spec: dict[str, Any], net: Any, loss_fn: Any, batches: Callable[[], Iterator], device: Any) -> dict:
    import torch

    net.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    with torch.no_grad(), _autocast(spec, device):
        for x, y in batches():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if spec["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            total += loss_fn(net(x), y).double() * len(y)
            n += len(y)
    return {"val_loss": float(total) / n}


def raw(spec_json: str) -> None:
    from torch.utils.data import DataLoader

    spec = json.loads(spec_json)
    device, net, train, val = _setup(spec)
    pin = device.type == "cuda"
    loader = DataLoader(train, batch_size=spec["batch_size"], shuffle=True, pin_memory=pin)
    val_loader = DataLoader(val, batch_size=spec["batch_size"], pin_memory=pin)
    _loop(spec, lambda epoch: iter(loader), lambda: iter(val_loader), device, net)


def limit(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    device, net, train, val = _setup(spec)
    xs, ys = (t.to(device) for t in train.tensors)
    vx, vy = (t.to(device) for t in val.tensors)
    bs = spec["batch_size"]

    def epoch_batches(epoch: int) -> Iterator:
        order = torch.randperm(len(xs), device=device)
        for lo in range(0, len(xs), bs):
            sel = order[lo:lo + bs]
            yield xs.index_select(0, sel), ys.index_select(0, sel)

    def val_batches() -> Iterator:
        return ((vx[lo:lo + bs], vy[lo:lo + bs]) for lo in range(0, len(vx), bs))

    _loop(spec, epoch_batches, val_batches, device, net)


def lightning(spec_json: str) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    spec = json.loads(spec_json)
    device, net, train, val = _setup(spec)
    loss_fn = _made(spec["loss"])
    cl = spec["channels_last"]

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def _loss(self, batch: Any) -> Any:
            x, y = batch
            return loss_fn(self.net(x.contiguous(memory_format=torch.channels_last) if cl else x), y)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self._loss(batch)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self) -> Any:
            return _made(spec["optimizer"], self.parameters())

    pin = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_epochs=spec["max_epochs"], max_steps=spec["max_steps"],
                            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            precision="bf16-mixed" if spec["precision"] == "bf16-mixed" else "32-true",
                            gradient_clip_val=spec["gradient_clip_val"] or None, default_root_dir=tmp)
        trainer.fit(Lit(), DataLoader(train, batch_size=spec["batch_size"], shuffle=True, pin_memory=pin),
                    DataLoader(val, batch_size=spec["batch_size"], pin_memory=pin))
        val_loss = trainer.callback_metrics.get("val_loss")
        emit(val_loss=float(val_loss) if val_loss is not None else math.nan, steps=trainer.global_step)


def launcher_cli(*args: str) -> None:
    """Exactly `python -m launcher ARGS`, in this process, once the step clock's hook is in place."""
    sys.argv = ["launcher", *args]
    runpy.run_module("launcher", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    name, *rest = sys.argv[1:]
    gpu_clock.install()
    # first, as `python -m` from the repository's root puts it: the GPU machine has the repository
    # (launcher/, recipes/), not the installed package
    sys.path.insert(0, str(REPO))
    globals()[name.replace("-", "_")](*rest)
