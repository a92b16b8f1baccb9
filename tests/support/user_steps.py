"""Models, data and steps of the shapes the default step excludes (tests/test_steps.py):

- token sequences of variable length, padded, trained with a token-sum step (loss sum + count) or
  a per-micro-batch mean step: the gradient-accumulation case the sum form exists for;
- pairs (x1, x2, labels) as dict batches, for a two-input model that returns its own loss when given
  labels (step=model_loss), its logits otherwise (step=dict_batch), and a contrastive step of the
  user's own that ignores the labels.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from launcher import StepOutput

VOCAB = 16


class TokenModel(nn.Module):
    """Per-token logits of the next token: an embedding and a linear layer (no mixing across time)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(tokens)))


def token_data(n: int = 8, max_len: int = 12, seed: int = 0) -> tuple[list[dict], None]:
    """n sequences of 1 to max_len real tokens, padded to max_len; labels -100 at the padding. Lengths
    vary widely, so micro-batches hold very different token counts."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 1 + (i * 5 + int(torch.randint(0, 3, (1,), generator=g))) % max_len
        tokens = torch.randint(0, VOCAB, (max_len,), generator=g)
        real = torch.arange(max_len) < length
        items.append({"tokens": torch.where(real, tokens, 0), "labels": torch.where(real, tokens.roll(-1), -100)})
    return items, None


def token_sum_step(model: nn.Module, batch: dict) -> StepOutput:
    """Cross-entropy summed over the real tokens, and their count: normalised by the launcher."""
    logits = model(batch["tokens"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return StepOutput(loss, count=(labels != -100).sum())


def token_mean_step(model: nn.Module, batch: dict) -> torch.Tensor:
    """The mean over this micro-batch's tokens: micro-batches with few tokens weigh as much as full ones."""
    logits = model(batch["tokens"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


class TwoInput(nn.Module):
    """model(x1, x2): two inputs, class logits; given labels, also its own loss (a dict, HF style)."""

    def __init__(self, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, 16), nn.Linear(dim, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Any:
        logits = self.head(torch.relu(self.a(x1) + self.b(x2)))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def pair_data(n: int = 96, dim: int = 4, classes: int = 3, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Two noisy views (x1, x2) of a class centre; 3/4 train, 1/4 validation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    labels = torch.randint(0, classes, (n,), generator=g)
    x1 = centres[labels] + 0.3 * torch.randn(n, dim, generator=g)
    x2 = centres[labels] + 0.3 * torch.randn(n, dim, generator=g)
    items = [{"x1": x1[i], "x2": x2[i], "labels": labels[i]} for i in range(n)]
    cut = n * 3 // 4
    return items[:cut], items[cut:]


def view_data(n: int = 128, dim: int = 4, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pairs of views of one random point: x2 is x1 turned by a fixed rotation, plus a little noise.
    Every pair is its own class (labels are unused): the contrastive step's data; 3/4 train."""
    g = torch.Generator().manual_seed(seed)
    turn = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    x1 = torch.randn(n, dim, generator=g)
    x2 = x1 @ turn + 0.05 * torch.randn(n, dim, generator=g)
    items = [{"x1": x1[i], "x2": x2[i], "labels": torch.tensor(0)} for i in range(n)]
    cut = n * 3 // 4
    return items[:cut], items[cut:]


class TwoTower(nn.Module):
    """model(x1, x2) -> (z1, z2): two inputs, two outputs (unit embeddings), no classes."""

    def __init__(self, dim: int = 4, width: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, width), nn.Linear(dim, width)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.a(x1), dim=-1), F.normalize(self.b(x2), dim=-1)


def contrastive_step(model: nn.Module, batch: dict, temperature: float = 0.5) -> StepOutput:
    """InfoNCE: each x1 must pick its own x2 among the batch's. The loss needs both inputs and the
    batch itself (its targets are positions, not data); the similarity rows go to the metrics."""
    z1, z2 = model(batch["x1"], batch["x2"])
    sims = z1 @ z2.T / temperature
    targets = torch.arange(len(sims), device=sims.device)
    return StepOutput(F.cross_entropy(sims, targets), sims, targets)
