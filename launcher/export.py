"""`python -m launcher.export CHECKPOINT OUT.pt [--format hf]`: the bare model's weights for inference.

CHECKPOINT is a step-* folder, its state.pt, a checkpoints/ folder or a run directory (its latest
complete checkpoint). Sharded (FSDP) checkpoints are reassembled from every rank's shard, whatever
the world size that wrote them. The result loads with torch.load(OUT, weights_only=True) into the
recipe's model on one device, for inference. Same as launcher.checkpoint.export_model(path, out).

--format hf: OUT is a folder that Hugging Face loads (`GPT2LMHeadModel.from_pretrained(OUT)`):
the recipe's model is built from the checkpoint's own config, given the checkpoint's weights and
written with its save_pretrained (safetensors). A model without save_pretrained is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

FORMATS = ("pt", "hf")


def main(argv: list[str]) -> int:
    fmt, argv = _format(argv)
    if fmt not in FORMATS:
        print(f"launcher.export: error: --format {fmt}: valid: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
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
    if fmt == "hf":
        try:
            out = _save_pretrained(folder, Path(argv[1]))
        except ValueError as e:
            print(f"launcher.export: error: --format hf: {e}", file=sys.stderr)
            return 2
    else:
        out = export_model(folder, Path(argv[1]))
    print(f"launcher.export: {folder} -> {out}", file=sys.stderr)
    return 0


def _format(argv: list[str]) -> tuple[str, list[str]]:
    """(--format's value, the other arguments); `--format hf` and `--format=hf` alike, "pt" by default."""
    rest, fmt, i = [], "pt", 0
    while i < len(argv):
        if argv[i] == "--format" and i + 1 < len(argv):
            fmt, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--format="):
            fmt = argv[i].partition("=")[2]
        else:
            rest.append(argv[i])
        i += 1
    return fmt, rest


def _save_pretrained(folder: Path, out: Path) -> Path:
    """The checkpoint's model, built as its run built it, written by its own save_pretrained."""
    import torch

    from .checkpoint.format import STATE, model_weights
    from .config import one_line
    from .launch.recipe import instantiate, target_of

    # The checkpoint's config, not the run dir's config.yaml: it is what built these very weights,
    # and a step folder copied away from its run still exports. mmap: state.pt may hold the
    # optimizer's state too, which is never read.
    config = torch.load(folder / STATE, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
    node: Any = config.get("model")
    if not isinstance(node, dict) or "_target_" not in node:
        raise ValueError(f"{folder}: its config has no model _target_ (a Python API run?); load the weights into "
                         "your model and call its save_pretrained")
    try:
        net = instantiate(node)
    except Exception as e:  # noqa: BLE001 - the recipe's code: whatever it raises is the user's one line
        raise ValueError(f"model ({target_of(node)}): {one_line(e)}") from None
    if not callable(getattr(net, "save_pretrained", None)):
        raise ValueError(f"the model ({target_of(node)}, a {type(net).__name__}) has no save_pretrained; valid: a "
                         "Hugging Face PreTrainedModel, or the default format (a state_dict file)")
    try:
        net.load_state_dict(model_weights(folder))
    except RuntimeError as e:  # the recipe's model changed since the checkpoint was written
        raise ValueError(f"the weights do not fit the model the config builds ({one_line(e)})") from None
    net.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
