"""EMA weights (launcher/fit/ema.py, issue 27 item 2), built on the callback API: equal to
torch.optim.swa_utils.AveragedModel with an EMA function bitwise on one rank, validation on the
average, model.pt exported from it, a sharded average put back together at another world size;
SIGKILL + resume bitwise and FSDP at 2 ranks against 1 rank are end-to-end (test_callbacks.py and below)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import launcher
from conftest import QUIET, SUPPORT, StopAt, run_cli
from launcher import Trainer
from launcher.config import UserError
from launcher.fit.ema import EMA


def _data(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)


class Reference(launcher.Callback):
    """torch's own AveragedModel, updated after every optimizer step."""

    def on_fit_start(self, run) -> None:
        self.avg = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def on_step_end(self, run) -> None:
        self.avg.update_parameters(run.model)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _fit(run_dir: Path, callbacks: list, **kw) -> tuple[Trainer, torch.nn.Module, list]:
    tr = Trainer(run_dir=run_dir, progress=False, logger="none", gpus=0, batch_size=16, max_epochs=3, **kw)
    net = _net()
    hist = tr.fit(net, torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), _data(96), _data(32, 1),
                  callbacks=callbacks)
    return tr, net, hist


def test_the_average_is_averaged_models_bitwise_and_validation_and_export_use_it(tmp_path: Path) -> None:
    ref = Reference()
    tr, net, hist = _fit(tmp_path / "a", [ref], ema_decay=0.9)
    ema = torch.load(tmp_path / "a" / "model-ema.pt", weights_only=True)
    theirs = dict(ref.avg.module.named_parameters())
    assert set(ema) == set(theirs) and all(torch.equal(ema[k], theirs[k].detach()) for k in ema)
    raw = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert not torch.equal(raw["0.weight"], ema["0.weight"]), "model.pt keeps the raw weights by default"
    # measured on the average: the last val_loss is the average's, and the raw weights are back after it
    _, net_v, hist_v = _fit(tmp_path / "v", [], ema_decay=0.9, ema_validate=True)
    assert [h["train_loss"] for h in hist_v] == [h["train_loss"] for h in hist], "validation changed no training"
    averaged = _net()
    averaged.load_state_dict(torch.load(tmp_path / "v" / "model-ema.pt", weights_only=True))
    assert hist_v[-1]["val_loss"] == pytest.approx(tr.evaluate(_data(32, 1), model=averaged)["test_loss"], rel=1e-6)
    assert hist_v[-1]["val_loss"] != hist[-1]["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(net_v.state_dict().values(), net.state_dict().values()))
    # exported: model.pt is the average, the last checkpoint still holds the raw weights
    _fit(tmp_path / "x", [], ema_decay=0.9, ema_export=True)
    out = torch.load(tmp_path / "x" / "model.pt", weights_only=True)
    assert all(torch.equal(out[k], ema[k]) for k in ema)
    last = torch.load(tmp_path / "x" / "checkpoints" / "last" / "model.pt", weights_only=True)
    assert torch.equal(last["0.weight"], raw["0.weight"])


def test_a_run_stopped_for_a_requeue_exports_nothing_until_it_ends(tmp_path: Path) -> None:
    class Ending(launcher.Callback):
        def on_fit_end(self, run) -> None:
            self.ending = run.ending

    said = Ending()
    tr, _, _ = _fit(tmp_path / "cut", [said], ema_decay=0.9, ema_export=True, stop=StopAt(8))
    assert tr.preempted and said.ending == "requeue"
    assert not (tmp_path / "cut" / "model.pt").exists() and not (tmp_path / "cut" / "model-ema.pt").exists()
    _fit(tmp_path / "cut", [said], ema_decay=0.9, ema_export=True)  # the requeued job: on to the end
    _fit(tmp_path / "straight", [], ema_decay=0.9, ema_export=True)
    assert said.ending == "done"
    for name in ("model.pt", "model-ema.pt"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("cut", "straight"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_every_n_steps_and_the_checks(tmp_path: Path) -> None:
    class Steps(launcher.Callback):
        def on_fit_start(self, run) -> None:
            self.avg = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(0.5))

        def on_step_end(self, run) -> None:
            if run.step % 4 == 0:
                self.avg.update_parameters(run.model)

    ref, ema = Steps(), EMA(0.5, every_n_steps=4)
    _fit(tmp_path / "a", [ema, ref])
    theirs = dict(ref.avg.module.named_parameters())
    assert ema.updates == 4 and all(torch.equal(v, theirs[k].detach()) for k, v in ema.full_weights().items())
    with pytest.raises(UserError, match=r"trainer.ema_decay=1.5: an EMA.s decay; valid: 0 \(off\), or 0 < decay < 1"):
        Trainer(ema_decay=1.5)


def test_a_sharded_average_is_put_together_at_another_world_size() -> None:
    """A checkpoint from before the average went through DCP held each rank's dim-0 shards (FSDP2's
    torch.chunk sizes, uneven: 3 rows in 2 + 1): they still load into a one-rank model."""
    model = torch.nn.Linear(4, 3)
    ema = EMA(0.9)

    class View:
        world_size, rank = 1, 0
        model = None

    view = View()
    view.model = model
    w, b = torch.arange(12.0).reshape(3, 4), torch.tensor([7.0, 8.0, 9.0])
    ema.load_rank_states([{"updates": 5, "sharded": True, "decay": 0.9, "average": {"weight": w[:2], "bias": b[:2]}},
                          {"updates": 5, "sharded": True, "decay": 0.9, "average": {"weight": w[2:], "bias": b[2:]}}])
    ema.on_fit_start(view)
    full = ema.full_weights()
    assert ema.updates == 5 and torch.equal(full["weight"], w) and torch.equal(full["bias"], b)


@pytest.mark.slow
def test_fsdp_at_two_ranks_averages_its_shards_like_one_rank(tmp_path: Path) -> None:
    """The same global batches (1 rank x 16 = 2 ranks x 8 of DistributedSampler's order): the gathered
    average of FSDP's shards equals the one-rank average within float noise, and still does after both
    runs go on for an epoch at 1 rank (the FSDP run's sharded average resumed at another world size)."""
    base = ["--config-dir", str(SUPPORT / "callback_conf"), "recipe=counted", "trainer.gpus=0", "trainer.max_epochs=2",
            "trainer.ema_decay=0.9", "model._target_=callback_samples.Wide", "~callbacks", *QUIET]
    one = run_cli([*base, "trainer.batch_size=16", f"run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*base, "trainer.batch_size=8", "trainer.nproc=2", "trainer.strategy=fsdp",
                   f"run.dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / r / "model-ema.pt", weights_only=True) for r in ("one", "two"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    raw = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert not all(torch.equal(raw[k], b[k]) for k in b)
    # one epoch more: the one-rank run goes on; the FSDP run's last checkpoint goes on at 1 FSDP rank (its 2
    # ranks' shards put together and cut again), in a new run dir (resume=PATH) with the one-rank run's batch
    last = tmp_path / "two" / "checkpoints" / "last"
    for run, extra in (("one", []), ("three", ["trainer.strategy=fsdp", f"resume={last}"])):
        more = run_cli([*base, "trainer.max_epochs=3", "trainer.batch_size=16", f"run.dir={tmp_path / run}", *extra],
                       cwd=tmp_path)
        assert more.returncode == 0 and "resumed from" in more.stderr, more.stderr[-3000:]
    a, b = (torch.load(tmp_path / r / "model-ema.pt", weights_only=True) for r in ("one", "three"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_a_sharded_checkpoint_without_the_average_loads_what_it_has(tmp_path: Path) -> None:
    """A sharded checkpoint written before an EMA was turned on holds no average: the parts that may be
    absent are loaded with what the checkpoint has (DCP would refuse the missing keys), the rest fills."""
    import torch.distributed.checkpoint as dcp

    from launcher.checkpoint.held import dcp_prefixes, held

    dcp.save({"model": {"w": torch.ones(3)}, "callback_shards": {}}, checkpoint_id=str(tmp_path))
    saved = dcp_prefixes(dcp.FileSystemReader(str(tmp_path)).read_metadata())
    assert {"model", "model.w"} <= saved
    template = {"model": {"w": torch.zeros(3)}, "callback_shards": held({"0:EMA": {"w": torch.zeros(3)}}, saved,
                                                                          "callback_shards")}
    assert template["callback_shards"] == {}
    dcp.load(template, checkpoint_id=str(tmp_path))
    assert torch.equal(template["model"]["w"], torch.ones(3))
