"""The package as a user gets it: a wheel built from this tree, installed without -e into a fresh
virtual env, runs a recipe from an empty directory, and installs `launcher` alone at the top level.

CI installs the checkout editable, which hides a wheel that lacks a subpackage (the wheel of the
day lacked launcher.trackers: every run failed) or that ships a stray top-level package (`recipes`,
which collides with a user's own). The fresh env takes torch and the other requirements from this
test's env through a path entry (no download, no CUDA build pulled in), never its editable launcher.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], cwd=out, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (found,) = out.glob("launcher-*.whl")
    return found


def test_the_wheel_holds_every_module_and_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"launcher"}, tops
    source = {str(p.relative_to(REPO)) for p in (REPO / "launcher").rglob("*.py")}
    source |= {str(p.relative_to(REPO)) for p in (REPO / "launcher" / "conf").rglob("*.yaml")}
    missing = sorted(source - set(names))
    assert not missing, f"the wheel lacks {missing}"


def test_the_installed_wheel_runs_a_recipe_from_an_empty_directory(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    py = venv / "bin" / "python"
    p = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    # torch, hydra, torchmetrics... from this env, appended after the venv's own site-packages: a .pth
    # line is a plain path (the editable launcher's finder in this env's .pth files is not run)
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "empty"
    work.mkdir()
    where = _run([str(py), "-c", "import launcher; print(launcher.__file__)"], cwd=work)
    assert where.stdout.strip().startswith(str(purelib)), where.stdout + where.stderr
    p = _run([str(venv / "bin" / "launcher"), "recipe=linreg", "trainer.max_epochs=1", "trainer.progress=false",
              "run.dir=run"], cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"config.yaml", "metrics.csv", "model.pt", "checkpoints"} <= {x.name for x in (work / "run").iterdir()}
    assert _run([str(py), "-c", "import recipes"], cwd=work).returncode != 0, \
        "a top-level `recipes` module was installed"
