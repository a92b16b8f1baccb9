"""Print docs/ARCHITECTURE.md's "who is where, by size" block from the tree (lines per module):
    python tools/module_sizes.py            # print it
    python tools/module_sizes.py --write    # replace the block in docs/ARCHITECTURE.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def block() -> str:
    package = ROOT / "launcher"
    rows = []
    for folder in sorted({p.parent for p in package.rglob("*.py")}, key=lambda f: (f != package, str(f))):
        if folder.name in ("recipes", "__pycache__"):
            continue
        files = sorted(p for p in folder.glob("*.py"))
        sizes = " · ".join(f"{p.stem} {len(p.read_text().splitlines())}" for p in files)
        name = "launcher/" if folder == package else f"{folder.relative_to(package)}/"
        rows.append(f"    {name:<18}{sizes}")
    return "\n".join(rows)


def main() -> None:
    text = block()
    if "--write" not in sys.argv:
        print(text)
        return
    doc = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(doc) if line.startswith("    launcher/ "))
    end = start
    while end < len(doc) and doc[end].startswith("    "):
        end += 1
    DOC.write_text("\n".join([*doc[:start], text, *doc[end:]]) + "\n")


if __name__ == "__main__":
    main()
