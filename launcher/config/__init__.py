"""Config schemas (registered in Hydra's ConfigStore) and the checks that run once, in the parent.

Every field carries a comment; every check raises ConfigError naming the field, the bad value and
what would be valid, so the CLI can print one line and exit 2 before any process or file exists.
The package imports nothing else from launcher (a leaf: tests/test_layout.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml

# the schema modules of this package (the package imports nothing else from launcher: a leaf)
from .errors import ConfigError, UserError, choice, non_negative, one_line, positive, positive_number
from .launchers import LAUNCHER_SCHEMAS, LAUNCHERS, SIGNALS, LocalLauncherConfig, SlurmLauncherConfig, check_launcher
from .loggers import LOGGER_SCHEMAS, LOGGERS, WANDB_MODES, LoggerConfig, check_logger, logger_from_dict
from .loggers import select as select_loggers
from .memory import check_memory, check_reshard_world
from .mesh import check_mesh
from .script import ScriptConfig, check_script, with_sweep

# The closed choices, as types for the code that consumes them and as tuples for the checks. Schema
# fields stay `str` (OmegaConf rejects Literal annotations): check_trainer checks them once.
Accelerator = Literal["auto", "cpu", "cuda", "xla"]
Strategy = Literal["auto", "ddp", "fsdp", "hsdp", "none"]
PrecisionName = Literal["32", "bf16-mixed", "16-mixed", "bf16-true"]  # what runs; "auto" resolves to one
NonFinite = Literal["error", "skip", "off"]
Mode = Literal["min", "max"]
Interval = Literal["epoch", "step"]
ACCELERATORS: tuple[str, ...] = get_args(Accelerator)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PRECISIONS: tuple[str, ...] = ("auto", *get_args(PrecisionName))
NONFINITE: tuple[str, ...] = get_args(NonFinite)
MODES: tuple[str, ...] = get_args(Mode)
INTERVALS: tuple[str, ...] = get_args(Interval)
RESUME_MODES = ("auto", "never")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # Hydra's YAML, shipped inside the package
# `async` is a Python keyword (no field can have that name): checkpoint.async / checkpoint_async -> async_save
FIELD_ALIASES = {("checkpoint", "async"): "async_save"}
XLA_INSTALL = ("torch-xla is not installed: pip install 'launcher[xla]' (a torch_xla wheel matching your torch; "
               "see the torch-xla install guide for TPU VMs)")


@dataclass
class TrainerConfig:
    max_epochs: int = 10  # epochs to train (recipes set their own); the run ends at max_epochs or max_steps, whichever first
    max_steps: int = -1  # optimizer steps to train in total; -1 = no step limit
    batch_size: int = 32  # samples per batch on EACH rank (global batch = batch_size x world size)
    eval_batch_size: int = 0  # per-rank batch for validation, evaluate and predict; 0 = same as batch_size
    gpus: Optional[int] = None  # GPUs per node: 0 = CPU, -1 = all visible, unset = one GPU if CUDA is there else CPU
    nproc: int = 1  # ranks per node when running on CPU (gpus resolves to 0)
    nodes: int = 1  # nodes in the job; >1 needs launcher.rdzv_endpoint (local) or launcher=slurm
    seed: int = 0  # seeds python, numpy, torch on every rank as fit starts, and the data order (API: see seed_everything)
    val_every_n_epochs: int = 1  # validate after every N-th epoch (the last epoch always validates)
    val_every_n_steps: int = 0  # also validate every N optimizer steps inside epochs (feeds early stopping); 0 = off
    monitor: str = "val_loss"  # metric for early stopping, best checkpoint, ReduceLROnPlateau: {train,val}_loss or _<metric>
    mode: str = "min"  # "min" or "max": which direction of `monitor` is better
    patience: int = 0  # stop after this many validations without improvement; 0 = no early stopping
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    scheduler_interval: str = "epoch"  # step the LR scheduler every "epoch" or every optimizer "step"
    progress: bool = True  # progress bar on rank 0 (loss, steps/s; the epoch's metrics when it ends)
    progress_refresh_s: float = 0.5  # seconds between progress-bar updates; each costs one host sync
    log_every_n_steps: int = 50  # per-step tracker rows (train_loss_step, lr, rates) every N steps; 0 = epoch rows only
    num_workers: int = 0  # DataLoader worker processes per rank (0 = load in the training process)
    persistent_workers: bool = False  # map-style data: keep the loader workers alive across epochs (needs num_workers >= 1)
    prefetch_factor: int = 0  # batches each loader worker reads ahead; 0 = torch's default (2); needs num_workers >= 1
    seed_per_sample: bool = True  # seed python/numpy/torch per sample in Dataset.__getitem__ from (seed, epoch, index): augmentation independent of workers, ranks, resume
    ledger: bool = True  # per epoch, how often each sample was trained (all ranks): RUN_DIR/ledger.jsonl
    ledger_counts: bool = False  # also each epoch's counts per sample id as RUN_DIR/ledger/epoch-NNNNN.npy
    dist_timeout_s: float = 600.0  # collective timeout: a rank that does not arrive ends the run after this
    join_timeout_s: float = 60.0  # start-up: a rank not in the process group after this ends the run, named, its stack in its log
    accelerator: str = "auto"  # auto (CUDA if gpus > 0, else CPU), cpu, cuda, xla (torch-xla: TPUs)
    strategy: str = "auto"  # auto (ddp when > 1 rank; fsdp with tensor_parallel > 1), ddp, fsdp (FSDP2 fully_shard), hsdp (FSDP inside a node, replicated across nodes), none
    hsdp_replicas: int = 0  # strategy=hsdp: replica groups of the data-parallel ranks (each shards the weights); 0 = one per node
    tensor_parallel: int = 1  # ranks splitting each block's matmuls (neighbouring ranks; data is sharded over the rest); 1 = off
    tp_plan: Any = None  # tensor_parallel > 1: null = the built-in plan (charlm, GPT-2, Llama), "module:function(model, tp_mesh)", or {module pattern: colwise | colwise_qkv | rowwise}
    fsdp_wrap: list[str] = field(default_factory=list)  # module class names sharded as FSDP units (e.g. [Block])
    fsdp_reshard_after_forward: Any = True  # FSDP: free each unit's gathered parameters after its forward (true), keep them for backward (false: more memory, one all-gather less), or N: reshard over groups of N ranks, e.g. a node, so backward gathers inside them (docs/big-models.md)
    fsdp_cpu_offload: bool = False  # FSDP: sharded parameters, gradients and optimizer state live in CPU memory; each unit is copied to the device for its compute (CPUOffloadPolicy)
    fsdp_param_dtype: str = "auto"  # FSDP: dtype the parameters are gathered and computed in (auto = their own, as trainer.precision made them; bfloat16 needs precision bf16-mixed)
    fsdp_reduce_dtype: str = "auto"  # FSDP: dtype of the gradient reduce-scatter (auto = fsdp_param_dtype's; float32 sums bf16 gradients without bf16 rounding)
    activation_checkpointing: Any = "off"  # recompute these blocks' activations in backward instead of keeping them: off, [Block] (every Block), {Block: 2} (every 2nd) (docs/big-models.md)
    precision: str = "auto"  # auto (bf16-mixed where bf16 is native, else 32: launcher/device/hardware.py), 32, bf16-mixed, 16-mixed, bf16-true
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step (no gradient all-reduce until the last)
    gradient_clip_val: float = 0.0  # clip the total gradient norm to this (over all ranks' shards); 0 = off
    nonfinite: str = "error"  # non-finite loss or gradient norm: error (stop, naming step and rank), skip the step, off
    compile: bool = False  # torch.compile the model (in place; checkpoints keep plain parameter names)
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights (e.g. 0.999; docs/callbacks.md); 0 = off
    ema_every_n_steps: int = 1  # update the average every N optimizer steps
    ema_validate: bool = False  # validation measures the average (swapped in for it, and back)
    spike_factor: float = 0.0  # > 1: a step whose loss passes this x the recent median goes back to the last checkpoint without its batches (docs/callbacks.md); 0 = off
    spike_window: int = 50  # the recent steps whose median loss a step is judged against
    spike_skip_steps: int = 1  # the spike's step and the N-1 before it: the batches left out
    spike_max_rollbacks: int = 3  # spikes again before passing the last one: one more and the run stops
    ema_export: bool = False  # RUN_DIR/model.pt holds the average (it is always in model-ema.pt; the raw weights stay in the last checkpoint)
    channels_last: Any = "auto"  # channels_last memory format, only where the inputs are 4-D (conv nets): auto, true, false
    peak_tflops: float = 0.0  # per-device peak TFLOP/s for MFU; 0 = from the GPU's name (observe/progress.py), none on CPU
    summary: bool = True  # print the model summary (layers, output shapes, parameters) on rank 0 when fit starts
    deterministic: bool = False  # deterministic kernels (torch, cuBLAS, cuDNN): GPU resume bitwise by contract; slower
    hang_timeout_s: Optional[float] = None  # no step ended for this long: each rank writes its stacks to RUN_DIR/logs/stacks-N/ (docs/observing.md); null = min(300, dist_timeout_s / 2); 0 = off
    goodput_every_s: float = 5.0  # rank 0 records the run's progress this often (and at each checkpoint, validation, epoch) for RUN_DIR/goodput.json (docs/observing.md); a killed attempt counts up to its last record; 0 = off
    profile: str = ""  # "START:END": a torch.profiler trace of optimizer steps START..END per rank in RUN_DIR/profile/ (docs/observing.md); "" = off
    straggler_every: int = 100  # every N steps the ranks compare their step times: one slower than the median by more than straggler_threshold of a step is named (docs/observing.md); 0 = off
    straggler_threshold: float = 0.2  # how much slower than the median rank, as a fraction of the median step time, names a straggler


@dataclass
class CheckpointConfig:
    enabled: bool = True  # write checkpoints at all (resume needs them)
    every_n_epochs: int = 1  # checkpoint at the end of every N-th epoch; 0 = off
    every_n_steps: int = 0  # also checkpoint every N optimizer steps (mid-epoch resume points); 0 = off
    async_save: bool = False  # checkpoint.async: write in the background while training goes on (one save in flight)
    save_top_k: int = 1  # also keep the k best checkpoints by trainer.monitor; 0 = none kept for being best
    keep_last: int = 2  # keep the N most recent checkpoints (>= 2 leaves a fallback if the newest is damaged)


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"  # run directory (config, checkpoints, metrics, logs); the same dir resumes
    id: str = ""  # run id (also the W&B run id); "" = read from run.dir, or mint a new one
    name: str = ""  # human-readable name (W&B display name); "" = the run directory's name


@dataclass
class Config:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: Any = field(default_factory=LocalLauncherConfig)  # local, slurm or ray (its group option brings its schema)
    run: RunConfig = field(default_factory=RunConfig)
    script: ScriptConfig = field(default_factory=ScriptConfig)  # `launcher run`: the user's script instead of a recipe
    sweep: dict[str, Any] = field(default_factory=dict)  # `launcher run --multirun`: sweep.NAME=a,b fills ${sweep.NAME} in the args
    resume: str = "auto"  # "auto" (latest complete checkpoint in run.dir, else fresh), "never", or a checkpoint path
    # The recipe: _target_ nodes that the worker instantiates (see conf/recipe/*.yaml).
    model: Any = None  # the nn.Module
    data: Any = None  # a callable returning (train_dataset, val_dataset)
    loss: Any = None  # the loss module, called as loss(outputs, targets); not needed by a step computing its own
    # the step: supervised (default: (inputs, targets) batches), dict_batch, model_loss, or a _target_ node
    # building a callable step(model, batch) (docs/your-model.md)
    step: Any = None
    metrics: Any = None  # name -> torchmetrics.Metric; logged as train_<name> and val_<name>
    optimizer: Any = None  # a partial (_partial_: true) taking the model's parameters
    scheduler: Any = None  # optional partial taking the optimizer
    callbacks: Any = None  # a list of _target_ nodes building launcher.Callback objects (docs/callbacks.md)


SECTIONS = {"trainer": TrainerConfig, "checkpoint": CheckpointConfig, "logger": LoggerConfig, "run": RunConfig,
            "script": ScriptConfig}
def section_schemas(launcher: str) -> dict[str, type]:
    """Every section's schema by its dotted key (`logger.wandb` too), for naming unknown keys."""
    return {**SECTIONS, **{f"logger.{n}": cls for n, cls in LOGGER_SCHEMAS.items()},
            "launcher": LAUNCHER_SCHEMAS.get(launcher, LocalLauncherConfig)}


RECIPE_KEYS = ("model", "data", "loss", "step", "metrics", "optimizer", "scheduler", "callbacks")


def register() -> None:
    """Put the schemas in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore  # the CLI's parent only: ranks never import Hydra

    cs = ConfigStore.instance()
    schema = Config()
    schema.launcher = None  # filled by the launcher group option, which brings its own schema
    cs.store(name="launcher_schema", node=schema)
    for name, cls in LAUNCHER_SCHEMAS.items():
        # top-level names, not a group: `launcher=` lists only the real options and --help no group of these
        cs.store(name=f"launcher_schema_{name}", node=cls)


def from_dict(d: dict) -> Config:
    """The typed Config from a resolved plain dict (the run directory's config.yaml)."""
    kw: dict[str, Any] = {k: cls(**(d.get(k) or {})) for k, cls in SECTIONS.items() if k != "logger"}
    kw["logger"] = logger_from_dict(d.get("logger"))
    launcher = d.get("launcher") or {}
    kw["launcher"] = LAUNCHER_SCHEMAS[launcher.get("name", "local")](**launcher)
    rest = {f.name: d.get(f.name, f.default) for f in dataclasses.fields(Config) if f.name not in kw}
    return Config(**kw, **rest)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_resolved_config(path: str | Path) -> Config:
    """The typed Config a rank runs: the resolved YAML the parent wrote (run dir or node-local file)."""
    with open(path) as f:
        return from_dict(yaml.safe_load(f))


def ranks_per_node(t: TrainerConfig) -> int:
    """Ranks on each node once trainer.gpus is resolved: one per GPU, else trainer.nproc CPU ranks."""
    return int(t.gpus) if t.gpus else t.nproc


# ---- checks -------------------------------------------------------------------------------------


def check_trainer(t: TrainerConfig) -> None:
    positive("trainer.max_epochs", t.max_epochs)
    if t.max_steps != -1:
        positive("trainer.max_steps", t.max_steps)
    positive("trainer.batch_size", t.batch_size)
    non_negative("trainer.eval_batch_size", t.eval_batch_size)
    positive("trainer.nproc", t.nproc)
    positive("trainer.nodes", t.nodes)
    if t.gpus is not None and (isinstance(t.gpus, bool) or not isinstance(t.gpus, int) or t.gpus < -1):
        raise ConfigError("trainer.gpus", t.gpus, "GPUs per node", "null (auto), -1 (all visible), 0 (CPU), N >= 1")
    positive("trainer.val_every_n_epochs", t.val_every_n_epochs)
    non_negative("trainer.val_every_n_steps", t.val_every_n_steps)
    non_negative("trainer.patience", t.patience)
    non_negative("trainer.log_every_n_steps", t.log_every_n_steps)
    non_negative("trainer.num_workers", t.num_workers)
    non_negative("trainer.prefetch_factor", t.prefetch_factor)
    if t.num_workers == 0 and (t.persistent_workers or t.prefetch_factor):  # torch would raise at the first epoch
        key, value = ("trainer.persistent_workers", True) if t.persistent_workers else (
            "trainer.prefetch_factor", t.prefetch_factor)
        raise ConfigError(key, value, "needs loader workers (trainer.num_workers=0)",
                          "trainer.num_workers >= 1, or the default (false, 0)")
    choice("trainer.mode", t.mode, MODES)
    choice("trainer.scheduler_interval", t.scheduler_interval, INTERVALS)
    choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    choice("trainer.strategy", t.strategy, STRATEGIES)
    t.precision = str(t.precision)  # `trainer.precision=32` arrives as an int; from here on one of PRECISIONS
    choice("trainer.precision", t.precision, PRECISIONS)
    choice("trainer.nonfinite", t.nonfinite, NONFINITE)
    positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    if t.channels_last not in ("auto", True, False):
        raise ConfigError("trainer.channels_last", t.channels_last, "unknown choice", "auto, true, false")
    if t.gradient_clip_val < 0:
        raise ConfigError("trainer.gradient_clip_val", t.gradient_clip_val, "must be >= 0 (0 = off)")
    if t.accelerator == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise ConfigError("trainer.accelerator", "xla", XLA_INSTALL, "auto, cpu, cuda")
    if t.strategy in ("fsdp", "hsdp") and t.precision == "16-mixed":
        raise ConfigError("trainer.precision", "16-mixed", "with trainer.strategy=fsdp each rank's GradScaler "
                          "would skip steps on its own shard's overflow", "bf16-mixed, 32, bf16-true")
    if t.peak_tflops < 0:
        raise ConfigError("trainer.peak_tflops", t.peak_tflops, "must be >= 0 (0 = unknown)")
    if t.min_delta < 0:
        raise ConfigError("trainer.min_delta", t.min_delta, "must be >= 0")
    if t.dist_timeout_s <= 0:
        raise ConfigError("trainer.dist_timeout_s", t.dist_timeout_s, "must be > 0 seconds")
    if t.join_timeout_s <= 0:
        raise ConfigError("trainer.join_timeout_s", t.join_timeout_s, "must be > 0 seconds")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError("trainer.ema_decay", t.ema_decay, "an EMA's decay", "0 (off), or 0 < decay < 1 (e.g. 0.999)")
    positive("trainer.ema_every_n_steps", t.ema_every_n_steps)
    if t.spike_factor and t.spike_factor <= 1:
        raise ConfigError("trainer.spike_factor", t.spike_factor, "a spike is a loss this many times the recent "
                          "median", "0 (off), or a factor > 1 (e.g. 3)")
    positive("trainer.spike_window", t.spike_window)
    positive("trainer.spike_skip_steps", t.spike_skip_steps)
    non_negative("trainer.spike_max_rollbacks", t.spike_max_rollbacks)
    if t.hang_timeout_s is not None and not 0 <= t.hang_timeout_s < t.dist_timeout_s:
        raise ConfigError("trainer.hang_timeout_s", t.hang_timeout_s, "the stacks must be written before the "
                          f"collective timeout (trainer.dist_timeout_s={t.dist_timeout_s:g}) ends the run",
                          "null (auto), 0 (off), 0 < seconds < trainer.dist_timeout_s")
    if t.goodput_every_s < 0:
        raise ConfigError("trainer.goodput_every_s", t.goodput_every_s, "must be >= 0 seconds (0 = off)")
    profile_window(t.profile)
    non_negative("trainer.straggler_every", t.straggler_every)
    positive_number("trainer.straggler_threshold", t.straggler_threshold, "a fraction of the median step time (e.g. 0.2)")
    check_memory(t)


def profile_window(profile: Any) -> Optional[tuple[int, int]]:
    """trainer.profile "START:END" as (START, END), 1 <= START <= END; None for "" (off)."""
    if profile in ("", None):
        return None
    start, sep, end = str(profile).partition(":")
    if not (sep and start.strip().isdigit() and end.strip().isdigit() and 1 <= int(start) <= int(end)):
        raise ConfigError("trainer.profile", profile, "a window of optimizer steps", '"" (off), or "START:END" with '
                          '1 <= START <= END (e.g. "10:15")')
    return int(start), int(end)


def check_checkpoint(c: CheckpointConfig) -> None:
    non_negative("checkpoint.every_n_epochs", c.every_n_epochs)
    non_negative("checkpoint.every_n_steps", c.every_n_steps)
    non_negative("checkpoint.save_top_k", c.save_top_k)
    positive("checkpoint.keep_last", c.keep_last)


def visible_gpus() -> int:
    """CUDA devices this process can see, counted through NVML: CUDA is not initialised in the
    parent (cudaGetDeviceCount would, and every CPU rank it forks then dies on its first CUDA call)."""
    import torch  # here, not at the top: `--help` and config errors must not wait for torch

    return torch.cuda.device_count()


def resolve_gpus(t: TrainerConfig, local: bool) -> int:
    """GPUs per node the run will use (0 = CPU), honouring trainer.accelerator. For a local run,
    more than visible is an error."""
    if t.accelerator in ("cpu", "xla"):
        return 0
    visible = visible_gpus() if local or t.gpus in (None, -1) or t.accelerator == "cuda" else None
    if t.accelerator == "cuda" and local and not visible:
        raise ConfigError("trainer.accelerator", "cuda", "CUDA sees no GPU on this machine", "auto, cpu")
    if t.gpus is None:
        return 1 if visible else 0
    if t.gpus == -1:
        if not visible:
            raise ConfigError("trainer.gpus", -1, "asks for all visible GPUs but CUDA sees none", "0 (CPU)")
        return visible
    if local and visible is not None and t.gpus > visible and not os.environ.get("LAUNCHER_TEST_SHARE_GPU"):
        raise ConfigError("trainer.gpus", t.gpus, f"this machine has {visible} visible GPU(s)",
                          f"0..{visible} or -1" if visible else "0 (CPU) or null")
    return t.gpus


def check_resume(resume: str) -> None:
    if resume in RESUME_MODES:
        return
    if not os.path.exists(os.path.expanduser(resume)):
        raise ConfigError("resume", resume, "no such checkpoint path", "auto, never, or an existing step-NNNNNNN directory")


def check_fields(cfg: Config) -> None:
    """The checks that need neither torch nor the machine: the CLI runs them before it imports
    torch, so a bad value is one line in well under a second."""
    if not str(cfg.run.dir).strip():
        raise ConfigError("run.dir", cfg.run.dir, "empty", "a directory for this run")
    check_trainer(cfg.trainer)
    check_checkpoint(cfg.checkpoint)
    check_logger(cfg.logger)
    choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    check_launcher(cfg.launcher, cfg.trainer.nodes)
    check_resume(cfg.resume)
    check_script(cfg.script, cfg.sweep)


def check(cfg: Config, local: bool = True) -> None:
    """The parent's checks of every section but the recipe (recipe.check: it imports the targets)."""
    check_fields(cfg)
    ranks = ranks_per_node(dataclasses.replace(cfg.trainer, gpus=resolve_gpus(cfg.trainer, local))) * cfg.trainer.nodes
    mesh = check_mesh(cfg.trainer, ranks, cfg.model)  # (and strategy=none with more than one rank)
    check_reshard_world(cfg.trainer.fsdp_reshard_after_forward, mesh.shard)  # a copy's shard group, not the world
