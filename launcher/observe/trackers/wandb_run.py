"""Weights & Biases on rank 0: one W&B run per launcher run (its id is the run id), continued
across resumes and requeues; offline when no API key is found or the online start fails."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Optional

from ...config import UserError, one_line

log = logging.getLogger("launcher")
# how long W&B may take to start online before the run falls back to offline (wandb's own default
# is 90 s, each retry included: a long stall at start for a run that would train fine offline)
WANDB_INIT_TIMEOUT_S = 10.0


class WandbRun:
    """logger=wandb. A run whose mode resolves to `disabled` logs nothing."""

    name = "wandb"

    def __init__(self, run_dir: Path, opts: dict, *, name: str, run_id: str, config: Optional[dict]) -> None:
        self.run = _start(run_dir, name, run_id, config, opts)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def log_history(self, history: list[dict[str, Any]]) -> None:
        pass  # the epoch's row reaches W&B through log_metrics

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int, requeued: bool) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key is configured (env or netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    # `wandb login` stores the key in ~/.netrc (or $NETRC); asking wandb itself would contact the server.
    hosts = [os.environ.get("WANDB_BASE_URL", ""), "api.wandb.ai", "api.forge.coreweave.com"]
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        found = any(rc.authenticators(h.split("//")[-1].rstrip("/")) for h in hosts if h)
    except (OSError, netrc.NetrcParseError):
        found = False
    return "online" if found else "offline"


def _start(run_dir: Path, name: str, run_id: str, config: Optional[dict], opts: dict) -> Any:
    mode = wandb_mode(opts.get("mode", "auto"))
    if mode == "disabled":
        return None
    if mode == "offline":
        # wandb's telemetry is set up from the environment before init's mode= applies; without
        # this it tries the network at exit even offline.
        os.environ["WANDB_MODE"] = "offline"
    import wandb  # optional extra ([wandb]) and slow to import: only for logger=wandb

    def init(mode: str) -> Any:
        # resume="allow" + the run's own id: a requeued or re-run job continues the same W&B run.
        return wandb.init(project=opts.get("project"), entity=opts.get("entity"), id=run_id, name=name,
                          resume="allow", dir=str(run_dir), config=config, mode=mode,
                          tags=list(opts.get("tags") or []) or None, group=opts.get("group"),
                          settings=wandb.Settings(console="off", silent=True, disable_git=True,
                                                  x_disable_stats=True, x_save_requirements=False,
                                                  init_timeout=WANDB_INIT_TIMEOUT_S))

    try:
        run = init(mode)
    except Exception as e:  # noqa: BLE001 - a bad key, no network, a server down: all of wandb's kinds
        if mode != "online":
            raise UserError(f"logger=wandb ({mode}): {one_line(e)}") from e
        # the run goes on: offline files in the run dir, uploaded later by `wandb sync`
        log.warning("W&B online start failed (%s); logging offline to %s/wandb instead "
                    "(`wandb sync` uploads it later)", one_line(e), run_dir)
        os.environ["WANDB_MODE"] = "offline"
        mode = "offline"
        # The failed start's stream still holds the run id in the wandb service it went to. A
        # service this process started is stopped by teardown; a shared one (WANDB_SERVICE, set by
        # a wandb run earlier in the parent, e.g. a notebook or a test session) lives on and would
        # refuse the id ("run ID ... is in use"): the offline run starts a service of its own.
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
        try:
            run = init(mode)
        except Exception as e2:  # noqa: BLE001 - e.g. run.dir/wandb not writable
            raise UserError(f"logger=wandb (offline after the online start failed): {one_line(e2)}") from e2
    log.info("W&B run %s (%s) in %s", run.id, mode, run.dir)
    return run
