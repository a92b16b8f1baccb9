"""MLflow on rank 0: one MLflow run per launcher run, continued across resumes and requeues.

The store is a SQLite file in the run directory unless logger.mlflow.tracking_uri names a server
(MLflow's file store is deprecated and refuses to start in recent releases). The MLflow run id is
kept in RUN_DIR/mlflow.json, written before training starts, so a resume, a requeue or a restart
after a crash before the first checkpoint all continue the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ...config import UserError, one_line
from . import flatten

log = logging.getLogger("launcher")
STATE_FILE = "mlflow.json"
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value's length (longer ones are cut, marked "...")
BATCH = 100  # MLflow's limit on params per log_batch call


class MlflowRun:
    """logger=mlflow: params (the resolved config, flattened) once, metrics per step and per epoch
    (sent in the background), model.pt as the artifact `model/model.pt` at the end of fit."""

    name = "mlflow"

    def __init__(self, run_dir: Path, opts: Any, *, name: str, run_id: str, config: dict) -> None:
        try:  # mlflow-skinny and SQLAlchemy are an extra ([mlflow]), slow to import: only when chosen
            from mlflow import MlflowClient
        except ImportError as e:
            raise UserError(f"logger=mlflow: {e} (pip install 'launcher[mlflow]')") from e
        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.run_dir, self.log_model, self.timeout_s = run_dir, opts.log_model, opts.timeout_s
        self.uri = opts.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        where = "logger.mlflow.tracking_uri" + ("" if opts.tracking_uri else " (default)")
        self.pending: list[Any] = []  # the background batches not yet known to be stored
        self.floor: dict[str, int] = {}  # per metric: the last step the store already holds
        try:
            with _bounded(self.uri, opts.timeout_s):  # a store that does not answer: one line in seconds, not minutes
                self.client = MlflowClient(tracking_uri=self.uri)
                self.id = self._continue(name, run_id, config, opts.experiment)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow's, requests' and SQLAlchemy's kinds alike
            valid = "; valid: a sqlite:/// path in a directory this user can write, or a tracking server" \
                if self.uri.startswith("sqlite:") else ""
            raise UserError(f"{where}={self.uri!r}: MLflow did not start: {one_line(e)}{valid}") from e
        log.info("MLflow run %s in %s", self.id, self.uri)

    def _continue(self, name: str, run_id: str, config: dict, experiment: str) -> str:
        """The stored MLflow run set back to RUNNING, or a new one with the config as params."""
        stored = _read_state(self.run_dir / STATE_FILE)
        if stored and stored.get("tracking_uri") == self.uri:
            self.client.update_run(stored["run_id"], status="RUNNING")
            run = self.client.get_run(stored["run_id"])
            # steps a killed attempt logged past the checkpoint this one resumes from come again,
            # with the same values (resume is bitwise): the store keeps the first of each
            for key in run.data.metrics:
                steps = [m.step for m in self.client.get_metric_history(run.info.run_id, key)]
                self.floor[key] = max(steps, default=-1)
            return run.info.run_id
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:  # a local store keeps its artifacts beside it (MLflow's default is ./mlruns in the cwd)
            local = None if self.uri.startswith(("http://", "https://", "databricks")) else \
                (self.run_dir / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=local)
        run = self.client.create_run(exp_id, run_name=name, tags={"launcher.run_id": run_id,
                                                                  "launcher.run_dir": str(self.run_dir)})
        from mlflow.entities import Param

        params = [Param(k, _param_value(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run.info.run_id, params=params[i:i + BATCH])
        _write_state(self.run_dir / STATE_FILE, {"tracking_uri": self.uri, "run_id": run.info.run_id,
                                                 "experiment_id": exp_id})
        return run.info.run_id

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self.floor.get(k, -1)]
        if metrics:  # queued: a slow server never holds up a training step
            self.pending.append(self.client.log_batch(self.id, metrics=metrics, synchronous=False))

    def log_history(self, history: list[dict[str, Any]]) -> None:
        self._drain()  # an epoch's metrics are stored before the next epoch begins

    def _drain(self) -> None:
        pending, self.pending = self.pending, []
        for op in pending:
            if op is not None:
                op.wait()

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int, requeued: bool) -> None:
        self._drain()
        model = self.run_dir / "model.pt"
        if self.log_model and trained and not exit_code and not requeued and model.is_file():
            self.client.log_artifact(self.id, str(model), "model")
        status = "FAILED" if exit_code else "KILLED" if requeued else "FINISHED"  # a resume sets RUNNING again
        self.client.set_terminated(self.id, status=status)


def _param_value(v: Any) -> str:
    text = str(v)
    return text if len(text) <= PARAM_VALUE_MAX else text[:PARAM_VALUE_MAX - 3] + "..."


def _read_state(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable as the MLflow run of this run dir ({one_line(e)}); "
                        "delete it to start a new MLflow run") from e


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


@contextmanager
def _bounded(uri: str, timeout_s: float) -> Iterator[None]:
    """MLflow's start, bounded by timeout_s; the user's own settings (if any) apply again once it has
    started. A server (http, databricks): MLflow's HTTP client retries 7 times with exponential
    back-off and waits 120 s per request by default, minutes before a start against a server that is
    down would fail: at start, one try with timeout_s as the request timeout. A database: see
    _engine_attempts."""
    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(math.ceil(timeout_s))}
    saved = {k: os.environ.get(k) for k in bounded}
    os.environ.update(bounded)
    try:
        if uri.startswith(("http://", "https://", "databricks")):
            yield
        else:
            with _engine_attempts(uri, timeout_s):
                yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _engine_attempts(uri: str, timeout_s: float) -> Iterator[None]:
    """SqlAlchemyStore builds its engine with mlflow.store.db.utils.create_sqlalchemy_engine_with_retry:
    MAX_RETRY_COUNT (10) attempts, 0.1 * (2**n - 1) s after the n-th failure (101 s in all, no
    setting for it), a 4-line warning before each retry: an unwritable SQLite file took 107 s and 51
    lines to fail. A SQLite file that does not open now does not open a second later (a locked one
    SQLite waits for itself, its busy timeout): one attempt. A database server may be coming back:
    the attempts whose back-off fits in timeout_s. Their warnings say what the error line says, so
    they are kept off stderr while MLflow starts."""
    import mlflow.store.db.utils as db  # SQLAlchemy's import: only for a store that uses it

    db_log = logging.getLogger(db.__name__)
    attempts, level = db.MAX_RETRY_COUNT, db_log.level
    db.MAX_RETRY_COUNT = 1 if uri.startswith("sqlite:") else min(attempts, _attempts_within(timeout_s))
    db_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        db.MAX_RETRY_COUNT = attempts
        db_log.setLevel(level)


def _attempts_within(timeout_s: float) -> int:
    """How many engine attempts MLflow's back-off (0.1 * (2**n - 1) s after the n-th) fits in timeout_s."""
    n, slept = 1, 0.1
    while slept <= timeout_s:
        n += 1
        slept += 0.1 * (2 ** n - 1)
    return n
