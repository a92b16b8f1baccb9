"""The docs' tables of config keys (docs/config.md; docs/slurm.md and docs/ray.md repeat their
launcher's), made from the schema: every field of the dataclasses in
launcher/config/ with its default and its one comment (the schema is the source; the docs' tables
were once copied by hand and drifted). tests/test_docs.py fails when a table differs from these;
rewrite them with

    python tests/support/config_tables.py --write      # or without --write: print what differs

Each such table follows a marker line `<!-- schema: NAME -->` (NAME: a key of tables()); every NAME
has its table in docs/config.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
DOC = DOCS / "config.md"  # every table is here
CONF = REPO / "launcher" / "conf"
MARKER = re.compile(r"^<!-- schema: (\S+) -->$")


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment at the end of its line in the class's source."""
    source = inspect.getsource(sys.modules[cls.__module__])
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return {st.target.id: by_line.get(st.end_lineno, "")  # type: ignore[union-attr]
            for st in node.body if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)}


def shown(value: Any) -> str:
    """A default as it is written on the command line (Hydra's override grammar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def table(cls: type, skip: tuple[str, ...] = ()) -> str:
    notes = comments(cls)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        rows.append(f"| `{f.name}` | `{shown(default(f))}` | {notes[f.name].replace('|', '/')} |")
    return "\n".join(rows)


GROUPS = {  # the group table's third column: what choosing an option sets
    "recipe": "model, data, loss, metrics, optimizer, scheduler, and the recipe's own trainer defaults ([recipes](recipes.md))",
    "launcher": "how ranks are started: elastic on this host, a SLURM job ([SLURM](slurm.md)), Ray actors ([Ray](ray.md))",
    "logger": "where rank 0 sends metrics, several at once: `logger=[csv,tensorboard]`; `none` = no metrics files "
              "([loggers](loggers.md))",
}


def groups() -> str:
    """Every option of every group, read from launcher/conf/ (the table once left out `ray`)."""
    defaults = {"recipe": "mnist", "launcher": "local", "logger": "csv"}
    rows = ["| group | options | what it sets |", "|---|---|---|"]
    for group, what in GROUPS.items():
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        cell = ", ".join(f"`{o}` (default)" if o == defaults[group] else f"`{o}`" for o in options)
        rows.append(f"| `{group}` | {cell} | {what} |")
    return "\n".join(rows)


def tables() -> dict[str, Callable[[], str]]:
    from launcher import config as C
    from launcher.config import launchers as L

    sections = ("trainer", "checkpoint", "logger", "launcher", "run", "script")
    out: dict[str, Callable[[], str]] = {"groups": groups,
                                         "top": lambda: table(C.Config, skip=sections)}
    for name in ("trainer", "checkpoint", "run", "script"):
        out[name] = lambda cls=C.SECTIONS[name]: table(cls)
    for name, cls in C.LOGGER_SCHEMAS.items():
        out[f"logger.{name}"] = lambda cls=cls: table(cls)
    for name, cls in L.LAUNCHER_SCHEMAS.items():
        out[f"launcher={name}"] = lambda cls=cls: table(cls)
    return out



def in_doc(text: str) -> dict[str, str]:
    """NAME -> the table that follows its marker in the page."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m:
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            found[m.group(1)] = "\n".join(rows)
    return found


def rewrite(text: str) -> str:
    made, out, lines, i = tables(), [], text.splitlines(), 0
    while i < len(lines):
        out.append(lines[i])
        m = MARKER.match(lines[i])
        i += 1
        if m and m.group(1) in made:
            out.append(made[m.group(1)]())
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    made, stale = tables(), []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        if "--write" in argv:
            if rewrite(text) != text:
                page.write_text(rewrite(text))
            continue
        have = in_doc(text)
        stale += [(page.name, name) for name in have if have[name] != made[name]()]
    missing = [name for name in made if name not in in_doc(DOC.read_text())]
    for page, name in stale:
        print(f"{page}: <!-- schema: {name} -->\n{made[name]()}\n")
    for name in missing:
        print(f"{DOC.name}: no table for {name}")
    return 1 if stale or missing else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
