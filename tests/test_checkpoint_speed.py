"""Checkpoints that cost training little (issue 12): async saves stage into host buffers kept from
save to save, a save never overwrites the buffers of the one still being written, and the run's
model.pt is a hard link to the newest checkpoint's weights instead of a second serialisation."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import QUIET, run_cli
from launcher.device import dist as D
from launcher.checkpoint import format as F
from launcher.checkpoint.manager import CheckpointManager
from launcher.checkpoint.staging import HostStage, dcp_stager
from launcher.config import CheckpointConfig
from launcher.checkpoint.adapters import ModelState


class _Optimizer:
    """The optimizer as a checkpoint part, as the trainer registers it (unsharded)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(sd)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 8))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(16, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _manager(tmp_path: Path, model: nn.Module, opt: torch.optim.Optimizer, *, async_save: bool = True,
             keep_last: int = 5, with_model: bool = True) -> CheckpointManager:
    states: dict[str, Any] = {"optimizer": _Optimizer(opt)}
    if with_model:
        states = {"model": ModelState(model, sharded=False), **states}
    cfg = CheckpointConfig(async_save=async_save, keep_last=keep_last, save_top_k=0)
    return CheckpointManager(tmp_path / "checkpoints", cfg, mode="min", dist=D.Dist(), states=states,
                             sharded=False, info={"run_id": "test"})


def _assert_same(a: Any, b: Any) -> None:
    """Bitwise equal, containers and tensors alike."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ---- (A) async saves: reused host buffers ------------------------------------------------------------

def test_host_buffers_are_reused_and_refilled() -> None:
    w = torch.arange(12.0).reshape(3, 4)
    state = {"model": {"w": w, "t": w.t()}, "n": 3}
    stage = HostStage()
    first = stage.stage(state)
    stage.ready()
    allocated, ptr = stage.allocated_bytes, first["model"]["w"].data_ptr()
    assert ptr != w.data_ptr() and torch.equal(first["model"]["w"], w)
    assert first["model"]["t"].stride() == w.t().stride(), "a view's layout is kept"
    w.mul_(-1)  # training updates the weights in place
    second = stage.stage(state)
    stage.ready()
    assert second["model"]["w"].data_ptr() == ptr, "the second save reuses the first one's buffer"
    assert stage.allocated_bytes == allocated, "no new allocation"
    assert torch.equal(second["model"]["w"], w), "the buffer holds the new values, not stale ones"
    state["model"]["w"] = torch.zeros(5)  # a tensor whose shape changed gets a buffer of its own
    third = stage.stage(state)
    assert third["model"]["w"].shape == (5,) and stage.allocated_bytes > allocated


def test_tied_tensors_stay_tied_and_module_metadata_is_kept() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    sd = nn.ModuleDict({"emb": emb, "head": head}).state_dict()
    staged = HostStage().stage(sd)
    assert type(staged) is type(sd) and staged._metadata == sd._metadata  # type: ignore[attr-defined]
    assert staged["emb.weight"].data_ptr() == staged["head.weight"].data_ptr()


def test_async_saves_reuse_buffers_and_write_the_values_of_their_step(tmp_path: Path) -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = _manager(tmp_path, model, opt)
    _train_step(model, opt)
    ckpt.save(1, 0, None)
    expected_1 = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.wait()
    buf = ckpt._host.buffer("model", "0.weight")
    moment = ckpt._host.buffer("optimizer", "state", 0, "exp_avg")
    assert buf is not None and moment is not None
    allocated = ckpt._host.allocated_bytes
    _train_step(model, opt)  # the weights and Adam's moments change in place
    ckpt.save(2, 0, None)
    ckpt.wait()
    for kept, path in ((buf, ("model", "0.weight")), (moment, ("optimizer", "state", 0, "exp_avg"))):
        assert ckpt._host.buffer(*path) is not None and ckpt._host.buffer(*path).data_ptr() == kept.data_ptr(), path
    assert ckpt._host.allocated_bytes == allocated, "the second save allocated nothing"
    step1, step2 = (F.load(tmp_path / "checkpoints" / F.step_name(s)) for s in (1, 2))
    _assert_same(step1["model"], expected_1)
    _assert_same(step2["model"], model.state_dict())  # the committed checkpoint loads bitwise
    _assert_same(step2["optimizer"], opt.state_dict())
    assert not torch.equal(step1["model"]["0.weight"], step2["model"]["0.weight"]), "no stale buffer"


def test_a_save_waits_for_the_one_in_flight_and_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    """The buffers are the previous save's data until it is written: the next save waits for it
    (logged), so the previous checkpoint holds its own step's weights, not the next step's."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = _manager(tmp_path, model, opt)
    release, writing = threading.Event(), threading.Event()
    real = F.write_state

    def slow_write(tmp: Path, state: dict[str, Any]) -> None:
        writing.set()
        release.wait(30)  # the disk is slow: step 1 is still being written when step 2 is saved
        real(tmp, state)

    monkeypatch.setattr(F, "write_state", slow_write)
    ckpt.save(1, 0, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert writing.wait(30)
    _train_step(model, opt)
    threading.Timer(0.3, release.set).start()
    with caplog.at_level("INFO", logger="launcher"):
        ckpt.save(2, 0, None)
    ckpt.wait()
    assert "checkpoint at step 2 waited" in caplog.text and "for the save of step 1 still being written" in caplog.text
    waited = float(caplog.text.split("checkpoint at step 2 waited ")[1].split(" s")[0])
    assert waited >= 0.2, caplog.text
    _assert_same(F.load(tmp_path / "checkpoints" / F.step_name(1))["model"], before)
    _assert_same(F.load(tmp_path / "checkpoints" / F.step_name(2))["model"], model.state_dict())


def test_dcp_stager_keeps_its_host_storages_across_saves() -> None:
    """The sharded path's stager (torch's DefaultStager, where this torch has one) is built to be
    reused: the second stage() refills the first one's storage with the new values."""
    stager = dcp_stager(on_gpu=False)
    if stager is None:
        pytest.skip(f"torch {torch.__version__}: dcp.async_save takes no stager")
    w = torch.randn(8, 8)
    first = stager.stage({"model": {"w": w}})
    ptr = first["model"]["w"].data_ptr()
    w.add_(1)
    second = stager.stage({"model": {"w": w}})
    assert second["model"]["w"].data_ptr() == ptr and torch.equal(second["model"]["w"], w)
    stager.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_state_is_staged_into_pinned_buffers_without_waiting() -> None:
    w = torch.randn(1024, 1024, device="cuda")
    stage = HostStage()
    staged = stage.stage({"w": w})
    w.add_(1)  # queued after the copy on the same stream: the copy reads the old values
    stage.ready()
    assert staged["w"].is_pinned() and torch.equal(staged["w"], (w - 1).cpu())
    again = stage.stage({"w": w})
    stage.ready()
    assert again["w"].data_ptr() == staged["w"].data_ptr() and torch.equal(again["w"], w.cpu())


@pytest.mark.slow
def test_async_checkpoints_equal_sync_ones_and_resume_bitwise(tmp_path: Path) -> None:
    """checkpoint.async stages the state into reused host buffers while training goes on: every
    checkpoint holds exactly what a sync save of that step holds, and a run resumed from one
    mid-epoch ends bitwise where an uninterrupted run ends."""
    args = ["recipe=linreg", "checkpoint.every_n_steps=3", "checkpoint.keep_last=30", *QUIET]
    sync, async_, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    for run_dir, extra in ((sync, ["trainer.max_epochs=3", "checkpoint.async=false"]),
                           (async_, ["trainer.max_epochs=2", "checkpoint.async=true"])):
        p = run_cli([*args, *extra, f"run.dir={run_dir}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(x.name for x in (async_ / "checkpoints").glob("step-*"))
    assert len(names) == 11, names  # steps 3..27 every 3, and the epoch ends 14 and 28
    for name in names:
        a, s = F.load(async_ / "checkpoints" / name), F.load(sync / "checkpoints" / name)
        assert a.keys() == s.keys()
        for part in set(a) - {"run_id", "config"}:  # each run has its own id and run.dir
            _assert_same(a[part], s[part])
    p = run_cli([*args, "trainer.max_epochs=3", "checkpoint.async=true", f"resume={async_}/checkpoints/step-0000027",
                 f"run.dir={resumed}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "step 27, epoch 2 at batch 13" in p.stderr, p.stderr[-2000:]
    final, ref = torch.load(resumed / "model.pt", weights_only=True), torch.load(sync / "model.pt", weights_only=True)
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)


# ---- (B) the run's model.pt: a hard link to the newest checkpoint's weights ----------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_weights_are_published_by_a_hard_link_that_outlives_pruning(tmp_path: Path, async_save: bool) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = _manager(tmp_path, model, opt, async_save=async_save, keep_last=1)
    dest = tmp_path / "model.pt"
    assert not ckpt.publish_weights(dest), "no checkpoint yet"
    _train_step(model, opt)
    ckpt.save(1, 0, None)
    ckpt.wait()
    folder = tmp_path / "checkpoints" / F.step_name(1)
    assert F.read_manifest(folder)["format"] == 2 and F.WEIGHTS in F.read_manifest(folder)["files"]
    assert "model" not in torch.load(folder / F.STATE, weights_only=True), "the weights are not written twice"
    assert ckpt.publish_weights(dest)
    assert os.stat(dest).st_ino == os.stat(folder / F.WEIGHTS).st_ino
    final = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_same(torch.load(dest, weights_only=True), model.state_dict())  # what model.pt held before format 2
    assert not list(tmp_path.glob(".model.pt*")), "no temp link left"
    _train_step(model, opt)
    ckpt.save(2, 0, None)  # keep_last=1: step 1 is pruned once step 2 is committed
    ckpt.wait()
    assert not folder.exists()
    _assert_same(torch.load(dest, weights_only=True), final)  # the link kept step 1's data
    assert F.verify(tmp_path / "checkpoints" / F.step_name(2)) is None


def test_no_weights_file_or_no_link_means_false_and_dest_untouched(tmp_path: Path, monkeypatch) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"previous")
    no_model = _manager(tmp_path / "a", model, opt, async_save=False, with_model=False)
    no_model.save(1, 0, None)  # like a sharded checkpoint: no model.pt in the step folder
    assert not no_model.publish_weights(dest)
    ckpt = _manager(tmp_path / "b", model, opt, async_save=False)
    ckpt.save(1, 0, None)

    def cross_device(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert not ckpt.publish_weights(dest)
    assert dest.read_bytes() == b"previous" and not list(tmp_path.glob(".model.pt*"))


def test_load_and_export_read_the_weights_file(tmp_path: Path) -> None:
    model = _net()
    folder = F.write(tmp_path / F.step_name(3), {"model": model.state_dict(), "other": torch.ones(2)}, {"step": 3})
    assert sorted(F.read_manifest(folder)["files"]) == [F.WEIGHTS, F.STATE]
    _assert_same(F.load(folder)["model"], model.state_dict())
    out = F.export_model(folder, tmp_path / "out.pt")
    _assert_same(torch.load(out, weights_only=True), model.state_dict())
    raw = bytearray((folder / F.WEIGHTS).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (folder / F.WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.pt: sha256 differs"):
        F.load(folder)


def test_many_files_are_hashed_at_once_and_the_corrupt_one_is_named(tmp_path: Path) -> None:
    # FSDP: one shard file per rank, every one hashed by rank 0 at commit and at resume; in threads
    import hashlib
    import threading

    shards = {f"sharded/__{r}_0.distcp": os.urandom(200_000 + r) for r in range(12)}
    tmp = F.begin(tmp_path / F.step_name(7))
    for name, data in shards.items():
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_bytes(data)
    seen: set[str] = set()
    real = F._sha256

    def spy(path: Path) -> str:
        seen.add(threading.current_thread().name)
        return real(path)

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "_sha256", spy)
            folder = F.commit(tmp, tmp_path / F.step_name(7), {"step": 7})
    finally:
        torch.set_num_threads(threads)
    files = F.read_manifest(folder)["files"]
    assert {n: files[n]["sha256"] for n in shards} == {n: hashlib.sha256(d).hexdigest() for n, d in shards.items()}
    assert len({t for t in seen if t.startswith("launcher-sha256")}) > 1, seen
    assert F.verify(folder) is None
    raw = bytearray((folder / "sharded/__9_0.distcp").read_bytes())
    raw[100] ^= 0x01  # same size: only the hash can tell
    (folder / "sharded/__9_0.distcp").write_bytes(bytes(raw))
    assert F.verify(folder) == f"{folder / 'sharded/__9_0.distcp'}: sha256 differs from the manifest (corrupt)"
