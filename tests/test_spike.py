"""Loss-spike rollback (launcher/fit/spike.py, issue 27 item 3): a poisoned batch makes the loss spike;
the run goes back to the checkpoint before it and trains on without that batch, ending with the weights
of a run whose data simply lacked those samples; spikes.jsonl and the ledger say what was left out."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from launcher.config import UserError

POISONED = range(96, 112)  # batch 6 of 10 (batch 16): the 7th optimizer step


def _data(drop: range = range(0), poisoned: range = POISONED) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 2, generator=g)
    y = x @ torch.tensor([[2.0], [-3.0]]) + 1
    y[poisoned.start:poisoned.stop] = 1e4  # a corrupt shard's labels
    keep = [i for i in range(160) if i not in drop]
    return TensorDataset(x[keep], y[keep])


def _fit(run_dir: Path, data: TensorDataset, **kw) -> Trainer:
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    tr = Trainer(run_dir=run_dir, progress=False, logger="none", gpus=0, max_epochs=1, checkpoint_every_n_steps=2,
                 **kw)
    tr.fit(net, torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.01),
           DataLoader(data, batch_size=16, shuffle=False))
    return tr


def test_a_spike_rolls_back_and_the_run_ends_as_if_the_samples_were_never_there(tmp_path: Path) -> None:
    rolled = _fit(tmp_path / "rolled", _data(), spike_factor=5, ema_decay=0.9)
    clean = _fit(tmp_path / "clean", _data(drop=POISONED), ema_decay=0.9)
    a, b = rolled.state_dict(), clean.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "not the weights of the run without those samples"
    a, b = (torch.load(tmp_path / r / "model-ema.pt", weights_only=True) for r in ("rolled", "clean"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the EMA (a callback) was not rolled back with the run"
    assert rolled.history[-1]["step"] == clean.history[-1]["step"] == 9
    line = json.loads((tmp_path / "rolled" / "spikes.jsonl").read_text())
    assert (line["step"], line["skipped_steps"], line["samples"]) == (7, [7], list(POISONED))
    assert line["rolled_back_to"].endswith("step-0000006") and line["loss"] > 5 * line["median"]
    ledger = json.loads((tmp_path / "rolled" / "ledger.jsonl").read_text())
    assert ledger["times"] == {"0": 16, "1": 144, "2+": 0}, "the window's samples trained 0 times"
    # a spike the guard is not allowed to roll back stops the run in one line
    with pytest.raises(UserError, match=r"^trainer.spike_factor: the loss spiked at step 7 .* after 0 rollbacks in "
                                        r"a row; valid: "):
        _fit(tmp_path / "stop", _data(), spike_factor=5, spike_max_rollbacks=0)
    with pytest.raises(UserError, match=r"trainer.spike_factor=0.5: .*valid: 0 \(off\), or a factor > 1"):
        Trainer(spike_factor=0.5)


def test_spikes_in_a_row_roll_back_each_time_up_to_the_limit(tmp_path: Path) -> None:
    """Two poisoned batches in a row (the 7th and 8th of 10): step 7 spikes, goes back to step 6 without its
    batch; the batch after it becomes step 7 and spikes again: a second rollback in a row, to step 6 again."""
    two = range(96, 128)
    rolled = _fit(tmp_path / "rolled", _data(poisoned=two), spike_factor=5, spike_max_rollbacks=2)
    clean = _fit(tmp_path / "clean", _data(drop=two, poisoned=two))
    a, b = rolled.state_dict(), clean.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "not the weights of the run without both batches"
    assert rolled.history[-1]["step"] == clean.history[-1]["step"] == 8
    lines = [json.loads(ln) for ln in (tmp_path / "rolled" / "spikes.jsonl").read_text().splitlines()]
    assert [(ln["step"], ln["samples"], ln["in_a_row"], Path(ln["rolled_back_to"]).name) for ln in lines] == [
        (7, list(range(96, 112)), 1, "step-0000006"), (7, list(range(112, 128)), 2, "step-0000006")]
    # one rollback allowed in a row: the second spike stops the run in one line
    with pytest.raises(UserError, match=r"^trainer.spike_factor: the loss spiked at step 7 .* after 1 rollbacks in "
                                        r"a row; valid: a larger trainer.spike_factor or spike_max_rollbacks"):
        _fit(tmp_path / "stop", _data(poisoned=two), spike_factor=5, spike_max_rollbacks=1)


@pytest.mark.slow
def test_two_ranks_agree_on_the_spike_and_end_as_without_the_samples(tmp_path: Path) -> None:
    """2 ranks, 8 samples each a step, in order: step 7 holds the corrupt samples on both ranks. Both
    roll back together (the line once), and the weights are those of the same command on the data
    without them."""
    from conftest import QUIET, SUPPORT, run_cli

    args = ["--config-dir", str(SUPPORT / "spike_conf"), "recipe=poisoned", "trainer.gpus=0", "trainer.nproc=2",
            "checkpoint.every_n_steps=2", *QUIET]
    rolled = run_cli([*args, "trainer.spike_factor=5", f"run.dir={tmp_path / 'rolled'}"], cwd=tmp_path)
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    assert rolled.stderr.count("loss spike at step 7") == 1, rolled.stderr[-3000:]
    clean = run_cli([*args, "+data.drop=true", f"run.dir={tmp_path / 'clean'}"], cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = (torch.load(tmp_path / r / "model.pt", weights_only=True) for r in ("rolled", "clean"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    line = json.loads((tmp_path / "rolled" / "spikes.jsonl").read_text())
    assert line["samples"] == list(range(96, 112)), "every rank's samples of the window"
