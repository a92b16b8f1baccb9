"""A model summary in the Keras / torchkeras style: one row per layer (name, type, output shape,
parameters, trainable), then the totals and the size of the weights.

Output shapes come from one forward pass of an example input, in eval mode and without gradients:
no dropout mask is drawn and no running statistic moves, so a run with the summary on trains
bitwise as one with it off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..device.modes import inference


def runs_channels_last(model: nn.Module, x: Any) -> tuple[bool, str]:
    """Does `model` take a channels_last input (a `.view()` of a conv output fails on one)? Leaves
    the model in channels_last when it does, in its own format when it does not."""
    model.to(memory_format=torch.channels_last)
    try:
        with inference(model):
            model(x.contiguous(memory_format=torch.channels_last))
    except RuntimeError as e:
        model.to(memory_format=torch.contiguous_format)
        return False, f"auto: the model fails on a channels_last input ({str(e).splitlines()[0][:80]})"
    return True, ""


def _shape(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str(list(out.shape))
    if isinstance(out, (list, tuple)) and out:
        return ", ".join(_shape(o) for o in out)
    return "-"


def summarize(model: nn.Module, example_input: Any) -> str:
    """The table for `model` fed `example_input` (a tensor, or a tuple of them, on the model's device)."""
    leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]
    leaves = leaves or [("(model)", model)]  # a model that is one layer
    shapes: dict[str, str] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:  # None: the output stays as it is
            shapes.setdefault(name, _shape(out))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in leaves]
    try:
        with inference(model):
            out = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    rows = [("layer", "type", "output shape", "params", "trainable")]
    for name, m in leaves:
        n = sum(p.numel() for p in m.parameters(recurse=False))
        trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        rows.append((name, type(m).__name__, shapes.get(name, "(not called)"), f"{n:,}",
                     ("yes" if trainable else "no") if n else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"model summary: {type(model).__name__}, output {_shape(out)}"]
    lines += ["  " + "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in rows]
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable_total = sum(p.numel() for p in params if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in model.buffers())
    lines.append(f"  total {total:,} parameters ({trainable_total:,} trainable, {total - trainable_total:,} frozen); "
                 f"weights and buffers {size / 2**20:.2f} MiB")
    return "\n".join(lines)


def print_summary(model: nn.Module, example_input: Any) -> str:
    """Trainer.summary(model, example_input): the table, printed (as Keras does) and returned."""
    text = summarize(model, example_input)
    print(text)
    return text
