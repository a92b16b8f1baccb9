"""The Python API forms its own world (launcher/launch/api_world.py, issue 26 item 3): a plain
`python train.py` with Trainer(nproc=2) starts its second rank itself and ends with the weights of the
same script under torchrun; under `srun -n 2` the script joins the world SLURM describes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, same_weights

TRAIN = '''
import functools, sys
import torch
import launcher
from launcher import Trainer

out, nproc = sys.argv[1], int(sys.argv[2])
launcher.seed_everything(0)
net = torch.nn.Linear(2, 1)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 2, generator=g)
data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)
tr = Trainer(nproc=nproc, gpus=0, max_epochs=2, batch_size=16, run_dir=out + "/run", progress=False, logger="none")
history = tr.fit(net, torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data)
if tr.dist.is_main:
    torch.save(tr.state_dict(), out + "/w.pt")
    print("world", tr.dist.world_size, "steps", history[-1]["step"])
'''


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


def _plain(script: Path, out: Path, nproc: int) -> subprocess.CompletedProcess:
    """`python train.py OUT NPROC`, as a user starts it; OUT is created first, and it must succeed."""
    out.mkdir()
    p = subprocess.run([sys.executable, str(script), str(out), str(nproc)], cwd=script.parent, env=cli_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_a_plain_script_with_two_ranks_equals_torchrun(tmp_path: Path) -> None:
    script = _script(tmp_path)
    (tmp_path / "torchrun").mkdir()
    plain = _plain(script, tmp_path / "plain", 2)
    assert plain.stdout.strip().splitlines() == ["world 2 steps 16"], "one rank 0, world of 2 (8 steps an epoch)"
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                          str(tmp_path / "torchrun"), "2"], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    same_weights(tmp_path / "plain" / "w.pt", tmp_path / "torchrun" / "w.pt")
    assert "rank 1 of 2" in (tmp_path / "plain" / "run" / "logs" / "rank-1.log").read_text()


def test_without_a_script_to_run_again_it_is_one_line(tmp_path: Path) -> None:
    code = TRAIN.replace("out, nproc = sys.argv[1], int(sys.argv[2])", f"out, nproc = {str(tmp_path)!r}, 2")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert ("UserError: trainer.nproc / trainer.gpus > 1: Trainer(...) forms its ranks by running this command "
            "again, and this interpreter has no script to run") in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_in_a_jupyter_notebook_one_rank_trains_as_the_script_does_and_two_are_one_line(tmp_path: Path) -> None:
    """A real kernel (nbclient, offline): Trainer.fit on one rank gives the weights the same code gives
    as a script; nproc=2 has no script to run again: the cell's error is the one line, no traceback."""
    import nbformat
    from nbclient import NotebookClient

    _plain(_script(tmp_path), tmp_path / "script", 1)
    (tmp_path / "nb").mkdir()
    one = TRAIN.replace("out, nproc = sys.argv[1], int(sys.argv[2])", f"out, nproc = {str(tmp_path / 'nb')!r}, 1")
    two = "tr = Trainer(nproc=2, gpus=0, max_epochs=1, run_dir=out + '/two', progress=False, logger='none')\n" \
          "tr.fit(net, torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data)"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(one), nbformat.v4.new_code_cell(two)])
    NotebookClient(nb, timeout=180, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=cli_env(PYTHONUNBUFFERED="1"))
    first, second = ([o for o in c.outputs] for c in nb.cells)
    assert [o.get("text", "").strip() for o in first if o.output_type == "stream" and o.name == "stdout"] == \
        ["world 1 steps 32"], first
    same_weights(tmp_path / "script" / "w.pt", tmp_path / "nb" / "w.pt")
    error = [o for o in second if o.output_type == "error"]
    assert len(error) == 1 and error[0].ename == "UserError", second
    assert len(error[0].traceback) == 1 and error[0].traceback[0].startswith(
        "UserError: trainer.nproc / trainer.gpus > 1: Trainer(...) forms its ranks by running this command again, "
        "and this interpreter has no script to run (a notebook"), error[0].traceback
    assert not (tmp_path / "nb" / "two").exists(), "refused before the run dir is touched"


@pytest.mark.slow
def test_under_srun_the_script_joins_the_world_slurm_describes(tmp_path: Path) -> None:
    if not shutil.which("srun") or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM cluster")
    script = _script(tmp_path)
    p = subprocess.run(["srun", "-N", "1", "-n", "2", "--time=5", sys.executable, str(script), str(tmp_path), "1"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines() == ["world 2 steps 16"], p.stdout + p.stderr[-3000:]
    assert "rank 1 of 2" in (tmp_path / "run" / "logs" / "rank-1.log").read_text()


@pytest.mark.slow
def test_a_rank_it_started_that_fails_is_named(tmp_path: Path) -> None:
    """Rank 1 exits with code 3 before it joins: rank 0 (waiting for it at the rendezvous) says which rank
    failed, with what, and ends instead of waiting for the join timeout."""
    script = tmp_path / "train.py"
    script.write_text('import os, sys\nif os.environ.get("RANK") == "1":\n    print("no data here", file=sys.stderr)\n'
                      '    sys.exit(3)\n' + TRAIN)
    p = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "rank 1 (pid " in p.stderr and ") exited with code 3: no data here" in p.stderr, p.stderr[-3000:]
