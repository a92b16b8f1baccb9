"""What goodput's records (launcher/observe/goodput.py, trainer.goodput_every_s) cost, in one process, as the
minimum of many repeats (robust on a shared machine):

  per step             the hooks the recorder adds to on_step_end (none), and Callbacks.fire("on_step_end") with
                       the built-in callbacks of goodput_every_s=5 against goodput_every_s=0, beside one step of
                       the overhead job (Linear(2, 1), batch 64, Adam)
  per boundary         one record appended to RUN_DIR/goodput.jsonl (a checkpoint, a validation, an epoch end)
  per goodput_every_s  the live record rewritten (RUN_DIR/goodput.live), and its share of the default 5 s period
  per attempt end      goodput.json recomputed from 3 attempts of 1,000 records each

    python bench/goodput_cost.py [--repeat 2000] [--dir /path/on/the/run/dirs/filesystem]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import machine, table
from hook_cost import View, best, overhead_step


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from launcher.config import TrainerConfig
    from launcher.fit.callbacks import Callbacks
    from launcher.observe import goodput_sums as S
    from launcher.observe.built_ins import built_ins

    tiny_step = overhead_step()
    on = Callbacks(built_ins([], TrainerConfig(goodput_every_s=5.0, hang_timeout_s=0.0)), View())  # type: ignore
    off = Callbacks(built_ins([], TrainerConfig(goodput_every_s=0.0, hang_timeout_s=0.0)), View())  # type: ignore
    added_hooks = len(on.by_hook["on_step_end"]) - len(off.by_hook["on_step_end"])
    step_s = best(tiny_step, args.repeat)
    fire_on = best(lambda: on.fire("on_step_end"), args.repeat)
    fire_off = best(lambda: off.fire("on_step_end"), args.repeat)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        rec = {"a": 1, "t": time.time(), "step": 123456, "ckpt": 12.3456, "val": 7.8912, "e": "ckpt"}
        append_s = best(lambda: S.append(d, rec), args.repeat // 4)
        live_s = best(lambda: S.write_atomic(d / S.LIVE, json.dumps(rec) + "\n"), args.repeat // 4)
        (d / S.JOURNAL).unlink()
        for a in range(1, 4):
            S.append(d, {"e": "start", "a": a, "t": 1000.0 * a, "t0": 1000.0 * a - 5, "step": 300 * (a - 1)})
            for i in range(1000):
                S.append(d, {**rec, "a": a, "t": 1000.0 * a + i * 0.5, "step": 300 * (a - 1) + i})
        summary_s = best(lambda: S.summarize(d), 5, inner=1)
    rows = [["hooks on on_step_end", f"{added_hooks}", "-", "-"],
            ["fire('on_step_end'), goodput on - off", f"{(fire_on - fire_off) * 1e6:+.3f} us",
             f"{step_s * 1e6:.0f} us (overhead job)", f"{(fire_on - fire_off) / step_s:+.3%}"],
            ["a record (checkpoint, validation, epoch)", f"{append_s * 1e6:.0f} us", "per boundary", "-"],
            ["the live record, every 5 s", f"{live_s * 1e6:.0f} us", "5 s", f"{live_s / 5:.4%} of wall"],
            ["goodput.json from 3,000 records", f"{summary_s * 1e3:.1f} ms", "per attempt end", "-"]]
    return f"{machine()}, torch threads 1\n\n" + table(["goodput", "cost", "per", "share"], rows)


if __name__ == "__main__":
    print(main())
