"""A model summary in the Keras / torchkeras style: one row per layer (name, type, output shape,
parameters, trainable), then the totals and the size of the weights.

Output shapes come from one forward pass of an example input, in eval mode and without gradients:
no dropout mask is drawn and no running statistic moves, so a run with the summary on trains
bitwise as one with it off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from ..device.modes import inference


def runs_channels_last(model: nn.Module, forward: Callable[[], Any]) -> tuple[bool, str]:
    """Does `model` take channels_last inputs (a `.view()` of a conv output fails on one)? `forward`
    runs it on them. Leaves the model in channels_last when it does, in its own format when not."""
    model.to(memory_format=torch.channels_last)
    try:
        with inference(model):
            forward()
    except RuntimeError as e:
        model.to(memory_format=torch.contiguous_format)
        return False, f"auto: the model fails on a channels_last input ({str(e).splitlines()[0][:80]})"
    return True, ""


def _shape(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str(list(out.shape))
    if isinstance(out, (list, tuple)) and out:
        return ", ".join(_shape(o) for o in out)
    if isinstance(out, Mapping):  # e.g. a Hugging Face ModelOutput: its tensors by name
        return ", ".join(f"{k} {_shape(v)}" for k, v in out.items() if isinstance(v, torch.Tensor)) or "-"
    return "-"


def summarize(model: nn.Module, example_input: Any) -> str:
    """The table for `model` fed `example_input` (a tensor, or a tuple of them, on the model's device)."""
    return summarize_forward(model, lambda: model(*example_input) if isinstance(example_input, tuple)
                             else model(example_input))


def summarize_forward(model: nn.Module, forward: Callable[[], Any]) -> str:
    """The table for `model`, its output shapes recorded while `forward` runs it (e.g. the fit's step
    on the first batch)."""
    leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]
    leaves = leaves or [("(model)", model)]  # a model that is one layer
    shapes: dict[str, str] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:  # None: the output stays as it is
            shapes.setdefault(name, _shape(out))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in leaves]
    whole: list[str] = []  # the model's own output (the step may run it with any arguments)
    hooks.append(model.register_forward_hook(lambda module, args, out: whole.append(_shape(out)) if not whole else None))
    try:
        with inference(model):
            forward()
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
    lines = [f"model summary: {type(model).__name__}, output {whole[0] if whole else '-'}"]
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
