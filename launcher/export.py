"""`python -m launcher.export CHECKPOINT OUT.pt`: the bare model's weights as one state_dict file.

CHECKPOINT is a step-* folder, its state.pt, a checkpoints/ folder or a run directory (its latest
complete checkpoint). Sharded (FSDP) checkpoints are reassembled from every rank's shard, whatever
the world size that wrote them. The result loads with torch.load(OUT, weights_only=True) into the
recipe's model on one device, for inference. Same as launcher.checkpoint.export_model(path, out).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    from .checkpoint.format import export_model, resolve, verify  # after the usage check: torch is slow to import

    try:
        folder = resolve(argv[0], what="CHECKPOINT")
    except ValueError as e:
        print(f"launcher.export: error: {e}", file=sys.stderr)
        return 2
    problem = verify(folder)
    if problem:
        print(f"launcher.export: error: {problem}", file=sys.stderr)
        return 2
    out = export_model(folder, Path(argv[1]))
    print(f"launcher.export: {folder} -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
