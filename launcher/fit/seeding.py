"""Seeds and RNG streams: seeding before the model is built, deterministic kernels, and a rank's
RNG streams as checkpointable values (the per-rank part of a checkpoint, the throwaway forward at
a DDP resume)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def make_deterministic(on: bool) -> None:
    """trainer.deterministic: deterministic kernels everywhere, before this process's first CUDA
    work (cuBLAS reads its workspace setting when its first handle is made). What makes a GPU run
    resume bitwise by contract: otherwise only by luck (atomics in some backward kernels, cuDNN's
    algorithm search). An op with no deterministic kernel then raises, naming itself."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (every CUDA device's too). `launcher.seed_everything`:
    call it before building the model, so two runs of one script start from the same weights;
    Trainer(seed=...) seeds each rank only when fit() starts, after the model's weights were drawn."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams in weights_only-loadable types (tensors, lists, ints)."""
    np_state = np.random.get_state()
    # numpy's key is uint32; held as int64 because torch.save cannot write a uint32 tensor before
    # torch 2.6 ("dtype torch.uint32 is not recognized"); every uint32 value fits in int64 exactly
    state: dict[str, Any] = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    # int64 from rng_state, uint32 in checkpoints written before it (those load on torch >= 2.6 only)
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
