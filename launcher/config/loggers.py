"""The logger group's schemas: where rank 0 sends metrics, several trackers at once.

`logger=[csv,tensorboard,mlflow]` is Hydra's own multi-select of a config group: each option file
(conf/logger/*.yaml) is packaged `_group_._name_`, so every tracker's keys live under its own name
(`logger.mlflow.tracking_uri=...`, `logger.wandb.project=...`) and never collide, a sweep can vary
the selection (`-m 'logger=[csv],[csv,wandb]'`), and a user's own config dir can add an option the
same way. A tracker not selected is null here. The selection is exactly what runs: the default is
[csv]; `logger=none` (or `logger=[]`) writes no metrics files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import ConfigError, choice

WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class CsvLogger:
    plots: bool = True  # also write plots.png (loss and each metric, train vs val) at the end of fit


@dataclass
class WandbLogger:
    project: str = "launcher"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); unset = the API key's default
    mode: str = "auto"  # auto (online if an API key is found, else offline), online, offline, disabled
    tags: list[str] = field(default_factory=list)  # W&B tags
    group: Optional[str] = None  # W&B group (e.g. a sweep name)


@dataclass
class TensorBoardLogger:
    dir: str = "tensorboard"  # event files: relative to the run directory, or an absolute path
    flush_s: float = 30.0  # seconds between writes to disk (also at every epoch end and the end of the run)


@dataclass
class MlflowLogger:
    tracking_uri: str = ""  # "" = a SQLite store in the run directory (mlflow.db); http(s)://host:port = a server
    experiment: str = "launcher"  # experiment name; created when missing
    log_model: bool = True  # upload the final model.pt as the run's artifact at the end of fit
    timeout_s: float = 10.0  # a server's request timeout: one that does not answer at start stops the run (exit 2)


@dataclass
class LoggerConfig:
    """The selected trackers; each is null unless `logger=[...]` names it."""

    csv: Optional[CsvLogger] = None  # metrics.csv (the history, rewritten each epoch) and plots.png
    wandb: Optional[WandbLogger] = None  # Weights & Biases (offline when no API key is found)
    tensorboard: Optional[TensorBoardLogger] = None  # event files under the run dir
    mlflow: Optional[MlflowLogger] = None  # an MLflow run: params, metrics, the model artifact

    def selected(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


LOGGER_SCHEMAS: dict[str, type] = {"csv": CsvLogger, "wandb": WandbLogger, "tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
LOGGERS = tuple(LOGGER_SCHEMAS)


def logger_from_dict(d: Optional[dict]) -> LoggerConfig:
    """The typed LoggerConfig of a resolved config. A run dir written before several loggers
    existed holds `{name: csv|wandb|none, project: ..., plots: ...}`: read as the selection it meant."""
    d = dict(d or {})
    if "name" in d:
        name, plots = d.pop("name"), d.pop("plots", True)
        old = {"csv": {"csv": {"plots": plots}},
               "wandb": {"csv": {"plots": plots}, "wandb": {k: v for k, v in d.items() if k in WandbLogger.__dataclass_fields__}}}
        d = old.get(name, {})
    return LoggerConfig(**{k: LOGGER_SCHEMAS[k](**(v or {})) for k, v in d.items() if v is not None})


def select(names: Any) -> LoggerConfig:
    """The Python API's `logger="csv"`, `logger=["csv", "tensorboard"]` or `logger="none"`."""
    chosen = [names] if isinstance(names, str) else list(names or [])
    chosen = [n for n in chosen if n != "none"]
    for n in chosen:
        choice("logger", n, (*LOGGERS, "none"))
    return LoggerConfig(**{n: LOGGER_SCHEMAS[n]() for n in chosen})


def check_logger(lg: LoggerConfig) -> None:
    if lg.wandb is not None:
        choice("logger.wandb.mode", lg.wandb.mode, WANDB_MODES)
    if lg.tensorboard is not None:
        if not str(lg.tensorboard.dir).strip():
            raise ConfigError("logger.tensorboard.dir", lg.tensorboard.dir, "empty", "a directory (relative to run.dir)")
        if lg.tensorboard.flush_s <= 0:
            raise ConfigError("logger.tensorboard.flush_s", lg.tensorboard.flush_s, "must be > 0 seconds")
    if lg.mlflow is not None:
        uri = lg.mlflow.tracking_uri
        schemes = ("http://", "https://", "sqlite:///", "databricks", "postgresql", "mysql", "mssql")
        if uri and not uri.startswith(schemes):
            raise ConfigError("logger.mlflow.tracking_uri", uri, "not a tracking URI MLflow can use",
                              '"" (SQLite in the run dir), http(s)://host:port, sqlite:///path.db, databricks, '
                              "a SQLAlchemy database URI")
        if not lg.mlflow.experiment.strip():
            raise ConfigError("logger.mlflow.experiment", lg.mlflow.experiment, "empty", "an experiment name")
        if lg.mlflow.timeout_s <= 0:
            raise ConfigError("logger.mlflow.timeout_s", lg.mlflow.timeout_s, "must be > 0 seconds")
