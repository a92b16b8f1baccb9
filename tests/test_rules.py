"""The pure rules, one by one, without a training run: early stopping, checkpoint retention,
batch order / sharding / resume position, GPU resolution, the Trainer's keywords, per-rank state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from launcher import config as C
from launcher.cli.compose import field_alias as _field_alias
from launcher.checkpoint import format as F
from launcher.checkpoint.manager import Retention
from launcher.fit.data import Batches
from launcher.device.dist import Dist
from launcher.config.keywords import from_kwargs, kwarg_names
from launcher.fit.state import EarlyStopping, TrainProgress
from launcher.checkpoint.adapters import Maybe, PerRank

# ---- early stopping ---------------------------------------------------------------------------------


def test_early_stopping_counts_validations_without_improvement() -> None:
    es = EarlyStopping("min", patience=2, min_delta=0.0)
    assert [es.update(v) for v in (1.0, 0.9, 0.95, 0.9, 0.8)] == [False, False, False, True, False]
    assert es.best == 0.8 and es.wait == 0


def test_early_stopping_max_mode_and_min_delta() -> None:
    es = EarlyStopping("max", patience=1, min_delta=0.1)
    assert es.update(0.5) is False  # the first value is always an improvement
    assert es.update(0.55) is True  # better, but not by more than min_delta
    assert es.best == 0.5
    assert es.update(0.61) is False and es.best == 0.61


def test_early_stopping_patience_0_never_stops_and_nan_is_no_improvement() -> None:
    es = EarlyStopping("min", patience=0, min_delta=0.0)
    assert not any(es.update(v) for v in (1.0, 2.0, 3.0, 4.0))
    es = EarlyStopping("min", patience=1, min_delta=0.0)
    assert es.update(float("nan")) is True and es.best is None  # nan never becomes the best
    assert es.update(5.0) is False and es.best == 5.0


def test_early_stopping_state_round_trips() -> None:
    a = EarlyStopping("min", patience=3, min_delta=0.0)
    for v in (1.0, 2.0, 3.0):
        a.update(v)
    b = EarlyStopping("min", patience=3, min_delta=0.0)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.wait) == (1.0, 2) and b.update(4.0) is True


# ---- retention: keep_last newest + save_top_k best -------------------------------------------------


def _names(*steps: int) -> list[str]:
    return [F.step_name(s) for s in steps]


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    r = Retention(tmp_path, save_top_k=2, mode="min", keep_last=2)
    r.top = [(0.1, F.step_name(3)), (0.2, F.step_name(1))]
    newest_first = _names(6, 5, 4, 3, 2, 1)
    assert r.doomed(newest_first) == _names(4, 2)  # 6, 5 newest; 3, 1 best


def test_retention_ranks_by_mode_and_replaces_a_resaved_step(tmp_path: Path) -> None:
    r = Retention(tmp_path, save_top_k=2, mode="max", keep_last=1)
    r.top = r.ranked(0.5, "a")
    r.top = r.ranked(0.7, "b")
    r.top = r.ranked(0.6, "c")
    assert r.top == [(0.7, "b"), (0.6, "c")]
    assert r.ranked(0.1, "b") == [(0.6, "c"), (0.1, "b")]  # the same checkpoint saved again, worse
    assert r.ranked(None, "d") == r.top  # no score: not ranked
    assert Retention(tmp_path, save_top_k=0, mode="min", keep_last=1).ranked(0.1, "x") == []


def test_retention_records_the_checkpoint_being_written(tmp_path: Path) -> None:
    r = Retention(tmp_path, save_top_k=1, mode="min", keep_last=1)
    r.top = [(0.5, "old")]
    r.pending = (0.2, "new")
    assert r.state_dict() == {"top": [[0.2, "new"]]}
    r.pending = None
    other = Retention(tmp_path, save_top_k=1, mode="min", keep_last=1)
    other.load_state_dict(r.state_dict())
    assert other.top == [(0.5, "old")]


def test_retention_commit_moves_links_and_prunes_on_disk(tmp_path: Path) -> None:
    r = Retention(tmp_path, save_top_k=1, mode="min", keep_last=1)
    scores = {1: 0.5, 2: 0.3, 3: 0.4}
    for step, score in scores.items():
        r.committed(F.write(tmp_path / F.step_name(step), {"w": torch.zeros(1)}, {"step": step}), score)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == _names(2, 3)  # best (2) and newest (3)
    assert (tmp_path / "last").resolve().name == F.step_name(3)
    assert (tmp_path / "best").resolve().name == F.step_name(2)
    assert r.best == (0.3, tmp_path / F.step_name(2))


# ---- batch sources ----------------------------------------------------------------------------------


def _data(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def _seen(b: Batches, epoch: int, start: int = 0) -> list[int]:
    return [int(v) for batch in b.epoch(epoch, start=start) for v in batch[1]]


def test_training_order_is_seeded_per_epoch_and_sharded_over_ranks() -> None:
    ds = _data(10)
    ranks = [Batches(ds, Dist(rank=r, world_size=2), train=True, batch_size=2, seed=7) for r in (0, 1)]
    e0 = [_seen(b, 0) for b in ranks]
    assert sorted(e0[0] + e0[1]) == list(range(10)) and not set(e0[0]) & set(e0[1])
    assert e0 == [_seen(b, 0) for b in ranks], "the same epoch gives the same order"
    assert e0 != [_seen(b, 1) for b in ranks], "another epoch, another order"
    other_seed = Batches(ds, Dist(rank=0, world_size=2), train=True, batch_size=2, seed=8)
    assert _seen(other_seed, 0) != e0[0]
    assert len(ranks[0]) == len(ranks[1]) == 3


def test_uneven_training_shards_are_padded_so_every_rank_steps_alike() -> None:
    ranks = [Batches(_data(9), Dist(rank=r, world_size=2), train=True, batch_size=2, seed=0) for r in (0, 1)]
    seen = [_seen(b, 0) for b in ranks]
    assert [len(s) for s in seen] == [5, 5] and set(seen[0] + seen[1]) == set(range(9))


def test_a_resumed_epoch_continues_at_its_batch() -> None:
    b = Batches(_data(20), Dist(), train=True, batch_size=3, seed=1)
    whole = _seen(b, 2)
    for start in range(len(b) + 1):
        assert _seen(b, 2, start=start) == whole[start * 3:]


def test_dataset_path_and_tensor_fast_path_give_the_same_batches() -> None:
    class Plain(torch.utils.data.Dataset):  # no .tensors: goes through DataLoader + collate
        def __init__(self, ds: TensorDataset) -> None:
            self.ds = ds

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int):
            return self.ds[i]

    ds = _data(11)
    fast = Batches(ds, Dist(rank=1, world_size=2), train=True, batch_size=2, seed=3)
    slow = Batches(Plain(ds), Dist(rank=1, world_size=2), train=True, batch_size=2, seed=3)
    assert fast.tensors is not None and slow.tensors is None
    for a, b in zip(fast.epoch(4, start=1), slow.epoch(4, start=1)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_evaluation_shards_count_every_sample_exactly_once() -> None:
    seen = [_seen(Batches(_data(7), Dist(rank=r, world_size=3), train=False, batch_size=2), 0) for r in range(3)]
    assert sorted(sum(seen, [])) == list(range(7))
    assert seen[0] == [0, 3, 6]


def test_a_user_dataloader_keeps_its_batch_size_shuffle_and_drop_last() -> None:
    b = Batches(DataLoader(_data(10), batch_size=4, shuffle=True, drop_last=True), Dist(), train=True)
    assert (b.batch_size, b.shuffle, b.drop_last, len(b)) == (4, True, True, 2)
    assert all(len(batch[1]) == 4 for batch in b.epoch(0))


def test_batches_warn_when_the_saved_order_differs(caplog) -> None:
    b = Batches(_data(4), Dist(), train=True, batch_size=2, seed=1)
    with caplog.at_level("WARNING", logger="launcher"):
        b.load_state_dict(b.state_dict())
        assert not caplog.text
        b.load_state_dict({**b.state_dict(), "seed": 2})
    assert "data order differs" in caplog.text


# ---- GPU resolution ---------------------------------------------------------------------------------


@pytest.fixture
def gpus_visible(monkeypatch):
    """The rule under test takes the visible-GPU count as input; set it as each case needs."""
    def visible(n: int) -> None:
        monkeypatch.setattr(C, "visible_gpus", lambda: n)
    return visible


@pytest.mark.parametrize("visible, gpus, accelerator, local, expected", [
    (0, None, "auto", True, 0), (4, None, "auto", True, 1), (4, -1, "auto", True, 4), (4, 2, "auto", True, 2),
    (0, 0, "auto", True, 0), (4, 0, "auto", True, 0), (4, 3, "cpu", True, 0), (4, 8, "xla", True, 0),
    (0, 8, "auto", False, 8),  # a SLURM submission: the login node's GPUs say nothing about the nodes'
])
def test_resolve_gpus(gpus_visible, visible, gpus, accelerator, local, expected) -> None:
    gpus_visible(visible)
    assert C.resolve_gpus(C.TrainerConfig(gpus=gpus, accelerator=accelerator), local) == expected


@pytest.mark.parametrize("visible, gpus, accelerator, key", [
    (0, -1, "auto", "trainer.gpus"), (2, 3, "auto", "trainer.gpus"), (0, None, "cuda", "trainer.accelerator"),
])
def test_resolve_gpus_refuses_what_the_machine_cannot_give(gpus_visible, visible, gpus, accelerator, key) -> None:
    gpus_visible(visible)
    with pytest.raises(C.ConfigError) as e:
        C.resolve_gpus(C.TrainerConfig(gpus=gpus, accelerator=accelerator), local=True)
    assert e.value.key == key


def test_ranks_per_node() -> None:
    assert C.ranks_per_node(C.TrainerConfig(gpus=4, nproc=2)) == 4
    assert C.ranks_per_node(C.TrainerConfig(gpus=0, nproc=3)) == 3


# ---- the Trainer's keywords and the CLI's async spelling ----------------------------------------------


def test_trainer_keywords_map_to_config_fields() -> None:
    cfg = from_kwargs({"max_epochs": 3, "checkpoint_async": True, "checkpoint_every_n_steps": 5,
                       "checkpoint_async_save": True, "logger": ["csv", "wandb"], "logger_wandb_project": "p",
                       "logger_csv_plots": False, "run_dir": "r",
                       "run_id": "abc", "resume": "never"})
    assert cfg.trainer.max_epochs == 3 and cfg.checkpoint.async_save is True
    assert cfg.checkpoint.every_n_steps == 5 and cfg.logger.selected() == ["csv", "wandb"]
    assert cfg.logger.wandb.project == "p" and cfg.logger.csv.plots is False
    assert from_kwargs({}).logger.selected() == ["csv"] and from_kwargs({"logger": "none"}).logger.selected() == []
    assert (cfg.run.dir, cfg.run.id, cfg.resume) == ("r", "abc", "never")
    names = kwarg_names()
    every_field = {(s, f) for s, cls in C.section_schemas("local").items() for f in cls.__dataclass_fields__
                   if s not in ("logger", "launcher")}
    assert every_field <= set(names.values()), "every config field has a keyword"


def test_an_unknown_keyword_names_the_valid_ones() -> None:
    with pytest.raises(TypeError, match="unknown argument 'checkpoint_asink'.*checkpoint_async"):
        from_kwargs({"checkpoint_asink": True})


def test_cli_async_spelling() -> None:
    assert _field_alias("checkpoint.async=true") == "checkpoint.async_save=true"
    assert _field_alias("+checkpoint.async=true") == "+checkpoint.async_save=true"
    assert _field_alias("checkpoint.async_save=true") == "checkpoint.async_save=true"
    assert _field_alias("trainer.max_epochs=2") == "trainer.max_epochs=2"


# ---- small Stateful parts -----------------------------------------------------------------------------


def test_per_rank_state_goes_back_to_its_rank_or_reseeds_at_another_world_size(caplog) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict:
            return {"n": self.n}

        def load_state_dict(self, sd: dict) -> None:
            self.n = sd["n"]

    c, reseeded = Counter(), []
    part = PerRank({"c": c}, Dist(rank=1, world_size=2), reseed=lambda: reseeded.append(True))
    saved = [{"rng": PerRank({}, Dist(), reseed=lambda: None).state_dict()[0]["rng"], "c": {"n": i}} for i in (5, 7)]
    torch.manual_seed(0)
    part.load_state_dict(saved)
    assert c.n == 7 and not reseeded
    with caplog.at_level("WARNING", logger="launcher"):
        part.load_state_dict(saved[:1] * 3)
    assert reseeded and "world size 3 resumed at 2" in caplog.text


def test_maybe_and_progress_round_trip() -> None:
    assert Maybe(None).state_dict() is None
    Maybe(None).load_state_dict({"x": 1})  # nothing to load into: fine
    p = TrainProgress(epoch=2, step=30, batch_in_epoch=4, history=[{"epoch": 1}], stopped_early=True)
    q = TrainProgress()
    q.load_state_dict(p.state_dict())
    assert q == p


# ---- hardware-aware defaults ------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("features, precision, channels_last", [
    ({"avx2": True}, "32", True),  # e.g. an AVX2-only EPYC: bf16 emulated, fp32
    ({"avx2": True, "avx512": True}, "32", True),  # AVX-512 without bf16 units
    ({"avx2": True, "avx512": True, "avx512_bf16": True}, "bf16-mixed", True),
    ({"avx2": True, "avx512": True, "amx": True}, "bf16-mixed", True),  # e.g. a Sapphire Rapids Xeon
])
def test_auto_precision_and_channels_last_follow_the_cpu(monkeypatch, features, precision, channels_last) -> None:
    from launcher.device import hardware

    full = {"avx2": False, "avx512": False, "avx512_bf16": False, "amx": False, **features}
    monkeypatch.setattr(hardware, "cpu_features", lambda: full)
    chosen, why = hardware.resolve_precision("auto", CPU)
    assert chosen == precision and why.startswith("auto: CPU")
    assert hardware.resolve_channels_last("auto", CPU, chosen)[0] is channels_last
    assert hardware.resolve_precision("16-mixed", CPU) == ("16-mixed", "set")  # explicit values stay
    assert hardware.resolve_channels_last(False, CPU, chosen) == (False, "set")


def test_the_cpu_is_read_from_torch_not_guessed() -> None:
    from launcher.device import hardware

    f = hardware.cpu_features()
    # torch 2.4 has neither probe: cpu_features() then reads both absent
    amx, avx512 = (getattr(torch.cpu, fn, lambda: False)() for fn in ("_is_amx_tile_supported", "_is_avx512_supported"))
    assert f["amx"] == amx and f["avx512"] == avx512
    native = f["amx"] or f["avx512_bf16"]
    assert hardware.resolve_precision("auto", CPU)[0] == ("bf16-mixed" if native else "32")


def test_channels_last_accepts_auto_true_false_only() -> None:
    C.check_trainer(C.TrainerConfig(channels_last=True))
    with pytest.raises(C.ConfigError, match="trainer.channels_last='yes': unknown choice; valid: auto, true, false"):
        C.check_trainer(C.TrainerConfig(channels_last="yes"))


def test_the_python_api_refuses_more_nodes_than_its_own(monkeypatch) -> None:
    """More ranks on this node it starts itself (tests/test_api_world.py); other nodes it cannot."""
    from launcher import Trainer

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    with pytest.raises(C.ConfigError, match="trainer.nodes=2: Trainer.* starts its other ranks on this node only"):
        Trainer(nodes=2)
    Trainer(nproc=2)  # (its ranks start when fit() needs them)
    with pytest.raises(TypeError, match="unknown argument 'epochs' \\(did you mean 'max_epochs'\\?\\)"):
        Trainer(epochs=5)


# ---- the model summary ------------------------------------------------------------------------------


def test_summary_lists_layers_shapes_and_parameters(capsys) -> None:
    from launcher import Trainer
    from launcher.recipes import mnist

    torch.manual_seed(0)
    net = mnist.Net()
    net.net[0].weight.requires_grad_(False)  # one frozen tensor
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    text = Trainer.summary(net, torch.zeros(4, 1, 28, 28))
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0] == "model summary: Net, output [4, 10]"
    conv = next(ln for ln in lines if " Conv2d " in ln and "[4, 32, 26, 26]" in ln)
    assert conv.split()[-2:] == ["320", "yes"]  # its bias still trains
    total = sum(p.numel() for p in net.parameters())
    assert f"total {total:,} parameters ({total - 288:,} trainable, 288 frozen)" in lines[-1]
    assert net.training and torch.equal(torch.get_rng_state(), rng), "no RNG drawn, train mode kept"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_summary_of_a_one_layer_model() -> None:
    from launcher.observe.summary import summarize

    text = summarize(torch.nn.Linear(2, 1), torch.zeros(3, 2))
    assert "(model)  Linear  [3, 1]" in text and "total 3 parameters" in text


def test_plots_are_readable_after_one_epoch() -> None:
    from launcher.observe.trackers.csv_files import figure

    fig = figure([{"epoch": 1, "step": 7, "train_loss": 0.64, "val_loss": 0.57, "train_acc": 0.6, "val_acc": 0.76}],
                 "run-a (abc)")
    loss, acc = fig.axes
    assert [t.get_text() for t in loss.get_xticklabels()] == ["1"], "whole epochs only"
    assert (loss.get_ylabel(), acc.get_ylabel()) == ("loss", "acc") and fig._suptitle.get_text() == "run-a (abc)"
    assert {t.get_text() for t in loss.texts} == {"0.64", "0.57"}, "each value beside its point"
    many = figure([{"epoch": e, "train_loss": 1 / e} for e in range(1, 41)])
    assert all(float(t).is_integer() for t in many.axes[0].get_xticks()) and not many.axes[0].texts
