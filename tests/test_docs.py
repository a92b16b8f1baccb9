"""The docs say what the code does (issue 23: README's tables, copied by hand, had drifted from the
schema, and a newcomer could not trust a command to run as written).

- docs' tables of config keys equal the dataclasses' fields, defaults and comments;
- every `python -m launcher` command in README.md and docs/ composes and passes the field checks;
- README's examples of bad input print what README says; the extras it names exist;
- (slow) README's commands that need no GPU, cluster or download run as written, in README's order
  in one empty directory, and its Python example too. A command is run for real when it is cheap
  (the linreg recipe, --help, --cfg, export); the rest are composed only.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

import config_tables
from conftest import REPO, cli_env

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 300


def shell_lines(text: str) -> Iterator[str]:
    """Lines of indented code blocks (4+ spaces; `\\` continuations joined), stripped."""
    held = ""
    for line in text.splitlines():
        if not line.startswith("    ") and not held:
            continue
        line = held + line.strip()
        if line.endswith("\\"):
            held = line[:-1] + " "
            continue
        held = ""
        yield line


def launcher_args(line: str) -> Optional[list[str]]:
    """The launcher's arguments of a shell line that runs it (`python -m launcher`, the `launcher`
    console script, `torchrun ... -m launcher`, after any VAR=value), else None."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens.pop(0)
    if tokens[:3] == ["python", "-m", "launcher"]:
        return tokens[3:]
    if tokens[:1] == ["launcher"]:
        return tokens[1:]
    if tokens[:1] == ["torchrun"] and "launcher" in tokens and tokens[tokens.index("launcher") - 1] == "-m":
        return tokens[tokens.index("launcher") + 1:]
    return None


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(line, launcher args) of every command on `page` that runs the launcher (bad-input examples,
    `$ ...`, are README's and tested apart)."""
    found = []
    for line in shell_lines(page.read_text()):
        args = launcher_args(line)
        if args is not None:
            found.append((line, args))
    return found


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A `-m` sweep's points, each a list of plain overrides (Hydra's own parser expands them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(point) for point in itertools.product(*choices)]


def compose_and_check(args: list[str], script: Any = None) -> list[Any]:
    """What the CLI's parent checks before anything starts, for each point of the command: Hydra's
    composition, unknown keys, every field, the recipe's targets and monitor (script: the parsed
    `launcher run` script, which has no recipe, its arguments filled with each point's sweep values)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launcher import config as C
    from launcher.cli.compose import field_alias, refuse_unknown_keys
    from launcher.launch import recipe

    flags = {"-m", "--multirun", "--help", "--info", "--cfg", "job", "all", "hydra"}
    overrides = [field_alias(a) for a in args if a not in flags]
    C.register()
    checked = []
    for point in sweep_points(overrides):
        with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base="1.3"):
            dcfg = compose(config_name="config", overrides=point)
        refuse_unknown_keys(dcfg)
        cfg = OmegaConf.to_object(dcfg)
        if script is not None:
            cfg.script = C.with_sweep(script, cfg.sweep)
        C.check_fields(cfg)
        if script is None:
            recipe.check(cfg)
        checked.append(cfg)
    return checked


# ---- the tables ----------------------------------------------------------------------------------


def test_config_tables_are_the_schema() -> None:
    """Every table of config keys in docs/ is the schema's fields, defaults and comments, and every
    section of the schema (and every group option in launcher/conf/) has its table in config.md."""
    made = config_tables.tables()
    have = config_tables.in_doc(config_tables.DOC.read_text())
    assert set(have) == set(made), f"tables missing from docs/config.md: {set(made) - set(have)}"
    for page in PAGES:
        for name, table in config_tables.in_doc(page.read_text()).items():
            assert table == made[name](), (f"{page.name}: the table of {name} differs from the schema; "
                                           "run python tests/support/config_tables.py --write")


def test_a_table_that_drifts_is_caught() -> None:
    """The comparison is not vacuous: a row whose default or meaning differs is found."""
    made = config_tables.tables()["trainer"]()
    drifted = made.replace("| `max_steps` | `-1` |", "| `max_steps` | `0` |")
    assert drifted != made
    doc = config_tables.DOC.read_text().replace(made, drifted)
    assert config_tables.in_doc(doc)["trainer"] != made


# ---- README ---------------------------------------------------------------------------------------


def test_readme_is_a_short_guide_that_keeps_the_ci_test_command() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move topics to docs/"
    assert "    python -m pytest -q" in lines, ".ci/run greps README for this exact line"
    assert '    python -m pytest -q -m "not slow"' in lines
    assert "docs/release-notes.md" in README.read_text()


def test_every_page_readme_links_to_exists() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_extras_readme_names_exist() -> None:
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set()
    for line in shell_lines(README.read_text()):
        for spec in re.findall(r"\.\[([a-z0-9_,-]+)\]", line):
            named |= set(spec.split(","))
    named |= set(re.findall(r"^\| `([a-z0-9_-]+)` \|", README.read_text(), flags=re.M)) & (extras | {"xla"})
    assert named and named <= extras, f"not extras in pyproject.toml: {named - extras}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_launcher_command_in_the_docs_composes(page: Path) -> None:
    """Each command's config as the CLI's parent checks it before anything starts (no GPU needed:
    resolving GPUs and the run dir happen later)."""
    for line, args in commands(page):
        if args[:1] == ["export"] or "--config-dir" in args:  # another command; a user's own config dir
            continue
        try:
            if args[:1] == ["run"]:  # `launcher run SCRIPT ... -- ARGS`: its split, then its overrides composed
                from launcher.cli import script_args

                parsed = script_args.parse(args[1:])
                assert parsed is not None, line
                assert compose_and_check(["~recipe", *parsed[1]], script=stand_in(parsed[0])), line
                continue
            assert compose_and_check(args), line
        except Exception as e:  # noqa: BLE001 - named with the line it came from
            pytest.fail(f"{page.name}: `{line}`: {type(e).__name__}: {e}")


def stand_in(script: Any) -> Any:
    """The docs' train.py and mypkg.train are examples: a file and a module that exist stand in."""
    import dataclasses

    return dataclasses.replace(script, path=__file__ if script.path else "", module="json" if script.module else "")


def test_readme_examples_of_bad_input_print_what_readme_says(tmp_path: Path) -> None:
    lines = README.read_text().splitlines()
    examples = [(ln.strip()[2:], lines[i + 1].strip()) for i, ln in enumerate(lines) if ln.startswith("    $ ")]
    assert len(examples) >= 3
    for command, said in examples:
        args = shlex.split(command, comments=True)
        # this interpreter by its path: a bare `python` finds its venv (pyvenv.cfg) through PATH, which
        # need not lead to it (tools/torch_floor.sh runs the tests from a venv that is not activated)
        args = [sys.executable, *args[1:]] if args[0] == "python" else args
        p = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, f"{command}: exit {p.returncode}\n{p.stderr[-2000:]}"
        got = p.stderr.strip()
        assert got.startswith(said.removesuffix("...").rstrip()) if said.endswith("...") else got == said, \
            f"{command}:\nREADME: {said}\nprints: {got}"
    assert list(tmp_path.iterdir()) == [], "bad input writes nothing"


# ---- README's commands, run as written (slow) ------------------------------------------------------


def cheap(args: list[str]) -> bool:
    """Run for real: no GPU, cluster, download or long training."""
    if args[:1] == ["export"] or {"--help", "--cfg"} & set(args):
        return True
    gpus = [a for a in args if a.startswith("trainer.gpus=")]
    loggers = [a for a in args if a.startswith("logger=")]
    return ("recipe=linreg" in args and not any(a.startswith("launcher=") for a in args)
            and all(a == "trainer.gpus=0" for a in gpus) and all("wandb" not in a and "mlflow" not in a for a in loggers))


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    ran = []
    for line, args in commands(README):
        if not cheap(args):
            continue
        p = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, f"`{line}` failed:\n{p.stderr[-3000:]}"
        ran.append(line)
    assert any("export" in r for r in ran) and any("recipe=linreg" in r for r in ran), ran
    assert (tmp_path / "model.pt").exists(), "README's export wrote the weights it says"


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    p = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last, evaluated = p.stdout.strip().splitlines()[-2:]
    assert "'epoch': 5" in last and "'val_acc'" in last, p.stdout
    assert "'test_loss'" in evaluated and "'test_acc'" in evaluated, p.stdout
    assert (tmp_path / "runs" / "api" / "model.pt").exists()
