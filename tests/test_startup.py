"""Start-up: what a run imports before its first step (issue 12, goal 3: nothing the run does not use)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, cli_env, rows


def test_torchmetrics_imports_without_pyplot_and_a_metric_still_plots() -> None:
    pytest.importorskip("matplotlib")
    code = """
import sys
from launcher.launch import recipe
Accuracy = recipe.locate("torchmetrics.classification.MulticlassAccuracy")
assert "matplotlib.pyplot" not in sys.modules, "torchmetrics' import loaded pyplot"
assert not any(type(f).__name__ == "_Finder" for f in sys.meta_path), "the finder outlived the import"
import torch
from torchmetrics.utilities import imports
assert bool(imports._MATPLOTLIB_AVAILABLE), "matplotlib is installed: torchmetrics must still say so"
m = Accuracy(num_classes=3)
m.update(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1]))
fig, ax = m.plot()
assert type(fig).__name__ == "Figure" and "matplotlib.pyplot" in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


@pytest.mark.slow
def test_a_cli_run_with_plots_never_imports_pyplot(tmp_path: Path) -> None:
    # the recipe's metrics are torchmetrics and metrics.csv's plots are drawn with matplotlib: the run
    # uses matplotlib (plots.png), but never pyplot (~0.5 s of start-up, and a GUI backend's probing)
    pytest.importorskip("matplotlib")
    args = ["recipe=circles", "trainer.gpus=0", "trainer.max_epochs=1", "trainer.summary=false", *QUIET,
            f"run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", *args], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert "torchmetrics" in imported and "matplotlib.figure" in imported
    assert "matplotlib.pyplot" not in imported
    assert (tmp_path / "run" / "plots.png").stat().st_size > 0


# ---- overlap.py: Hydra's composition in a forked child while the parent imports torch -------------

def _overlap_script(tmp_path: Path, compose_body: str) -> Path:
    script = tmp_path / "prog.py"
    script.write_text(f"""
import os, sys, time
from pathlib import Path
from launcher.cli import overlap
from launcher.config import faults
faults.raise_on_sigterm()  # as the CLI does before composing
def compose():
    Path({str(tmp_path / 'composing')!r}).touch()
{compose_body}
result = overlap.compose_beside(compose, lambda: __import__("torch"))
print("parent got", result, "torch" in sys.modules, flush=True)
""")
    return script


def _start(script: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script)], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable CPU: the composition runs in-process, nothing to overlap")


def test_the_childs_result_reaches_the_parent_which_has_imported_torch_meanwhile(tmp_path: Path) -> None:
    _two_cpus()
    p = _start(_overlap_script(tmp_path, "    return {'pid': os.getpid(), 'dirs': [1, 2]}"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    got = eval(out.split("parent got ", 1)[1].rsplit(" ", 1)[0])  # noqa: S307 - our own dict's repr
    assert got["dirs"] == [1, 2] and got["pid"] != p.pid, "composed in a child"
    assert out.strip().endswith("True"), "torch imported by the parent while the child composed"


@pytest.mark.parametrize("body, code, line", [
    ("    print('launcher: error: trainer.batch_size=0: must be positive', file=sys.stderr); sys.exit(2)", 2,
     "launcher: error: trainer.batch_size=0: must be positive"),
    ("    print('usage: ...'); sys.exit(0)", 0, "usage: ..."),
])
def test_what_the_child_reports_is_all_that_is_said_and_its_code_is_the_exit(tmp_path: Path, body: str, code: int,
                                                                           line: str) -> None:
    p = _start(_overlap_script(tmp_path, body))
    out, err = p.communicate(timeout=120)
    assert p.returncode == code
    assert (out + err).strip() == line  # once: not again by the parent, and nothing more


def test_a_bug_in_the_composition_keeps_its_traceback(tmp_path: Path) -> None:
    p = _start(_overlap_script(tmp_path, "    raise ValueError('a bug')"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" in err and "ValueError: a bug" in err and "parent got" not in out


@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_a_signal_during_composition_is_reported_once(tmp_path: Path, sig: int, to_group: bool, code: int) -> None:
    # Ctrl-C reaches the whole process group; a SIGTERM may reach the parent alone (kill PID): either
    # way the child reports it, once, and the command exits 128 + N
    _two_cpus()
    body = ("    try:\n        time.sleep(60)\n    except KeyboardInterrupt as e:\n"
            "        print('interrupted', file=sys.stderr); sys.exit(faults.exit_code(e))")
    p = _start(_overlap_script(tmp_path, body))
    deadline = time.monotonic() + 60
    while not (tmp_path / "composing").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
        time.sleep(0.01)
    (os.killpg if to_group else os.kill)(p.pid, sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.count("interrupted") == 1 and "parent got" not in out, err


@pytest.mark.slow
def test_the_cli_composes_beside_torch_and_in_process_on_one_cpu(tmp_path: Path) -> None:
    # the parent never imports Hydra when a second CPU lets the child compose; on one CPU it does it itself
    _two_cpus()
    run = ["recipe=linreg", "trainer.gpus=0", "trainer.max_epochs=1", "trainer.summary=false", *QUIET]
    code = ("import os, sys; {pin}sys.argv = ['launcher', *{args!r}]; from launcher.__main__ import recipe_run; recipe_run(); "
            "print('hydra here:', 'hydra' in sys.modules)")
    for pin, expect in (("", "False"), ("os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); ", "True")):
        args = [*run, f"run.dir={tmp_path / expect}"]
        p = subprocess.run([sys.executable, "-c", code.format(pin=pin, args=args)], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.strip().endswith(f"hydra here: {expect}")
        assert len(rows(tmp_path / expect)) == 1


def test_a_composition_killed_outright_is_named(tmp_path: Path) -> None:
    _two_cpus()
    p = _start(_overlap_script(tmp_path, "    os.kill(os.getpid(), 9)"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 137
    assert err.strip() == f"launcher: error: the config's composition (pid {err.split('pid ')[1].split(')')[0]}) " \
                          "was killed by SIGKILL"


@pytest.mark.slow
def test_hydra_job_env_set_reaches_the_ranks(tmp_path: Path, mnist_root: Path) -> None:
    # Hydra sets hydra.job.env_set only around its task function, which composes (in a child, on 2
    # CPUs); the run starts after it: the variables must still be there when the ranks read them
    # (data.root is expanded by the recipe at run time, not by Hydra)
    args = ["recipe=mnist", "data.root=$LAUNCHER_TEST_MNIST", "data.train_limit=256", "data.val_limit=128",
            "trainer.gpus=0", "trainer.nproc=2", "trainer.max_steps=2", "trainer.summary=false", *QUIET,
            f"+hydra.job.env_set.LAUNCHER_TEST_MNIST={mnist_root}", f"run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert rows(tmp_path / "run")[-1]["step"] == "2"
