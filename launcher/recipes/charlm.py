"""Character language model recipe: a small GPT-style transformer on a generated English-like corpus.

The corpus comes from a seeded random grammar written for this project (no download, no borrowed
prose): sentences with subject-verb agreement ("the cat sees" / "the cats see"), a/an before
vowels, tense, numbers that agree with plural nouns, relative clauses, questions, compound
sentences, and arithmetic statements such as "17+25=42.". That is enough structure for a tiny
model to push the loss far below the uniform ln(len(VOCAB)), so a run shows real learning in a
few hundred steps on a CPU.

The model is a pre-LayerNorm decoder-only transformer. Its repeated unit is ``Block``, which is
the class the launcher shards on (trainer.fsdp_wrap: [Block]); the LM head is NOT tied to the
token embedding, because FSDP2 needs tied parameters inside one wrapped unit and the embedding
and the head sit on opposite ends of the blocks.

Attributes the launcher reads from the model when present:

* ``tokens_per_sample`` (int): tokens in one sample, = block_size (for tokens/s).
* ``flops_per_sample`` (float): training FLOPs (forward + backward) per sample; MFU =
  flops_per_sample * samples/s / peak FLOP/s (launcher/observe/progress.py). The estimate of the PaLM paper,
  appendix B (arXiv:2204.02311; nanoGPT's estimate_mfu too), per sample of T tokens:
  6 * N * T + 12 * n_layer * n_embd * T**2. N counts the weights of matmuls: the LM head is in it,
  the two embedding tables (lookups) are not. (nanoGPT drops only the position table: its head is
  the tied token table, so its head matmul is counted there too.) Biases and LayerNorm weights,
  0.14% of N at the GPT-2 small size, are counted as nanoGPT counts them.

On a GPU: attention is F.scaled_dot_product_attention(is_causal=True) (flash, no mask tensor);
nothing in the model, loss or TokenAccuracy reads a value back to the host during a step; and
``datasets(device="auto")`` puts the windows on the rank's GPU, where the launcher slices batches
without a copy per step. conf/recipe/charlm_gpt2.yaml is the GPT-2 small preset (bench/gpu.py).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["VOCAB", "GPT", "Block", "SeqCrossEntropy", "TokenAccuracy", "corpus", "datasets", "decode", "encode"]

# ---- the grammar ---------------------------------------------------------------------------------

# (singular, plural)
_NOUNS = [
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("child", "children"),
    ("teacher", "teachers"), ("farmer", "farmers"), ("box", "boxes"), ("apple", "apples"),
    ("book", "books"), ("river", "rivers"), ("tree", "trees"), ("house", "houses"), ("mouse", "mice"),
    ("owl", "owls"), ("engine", "engines"), ("idea", "ideas"), ("wizard", "wizards"),
]
_ADJECTIVES = ["small", "big", "red", "green", "old", "young", "quiet", "happy", "tall", "blue",
               "clever", "lazy", "angry", "early", "unusual"]
# (base, third person singular, past)
_TRANSITIVE = [
    ("see", "sees", "saw"), ("like", "likes", "liked"), ("find", "finds", "found"),
    ("carry", "carries", "carried"), ("watch", "watches", "watched"), ("build", "builds", "built"),
    ("follow", "follows", "followed"), ("eat", "eats", "ate"), ("push", "pushes", "pushed"),
    ("know", "knows", "knew"),
]
_INTRANSITIVE = [
    ("sleep", "sleeps", "slept"), ("run", "runs", "ran"), ("sing", "sings", "sang"),
    ("wait", "waits", "waited"), ("jump", "jumps", "jumped"), ("fly", "flies", "flew"),
]
_ADVERBS = ["quickly", "slowly", "today", "again", "quietly", "at night", "every day"]
_PREPOSITIONS = ["near", "under", "behind", "with", "over", "beside"]
_SINGULAR_DETS = ["the", "a", "every", "this", "that", "one"]
_PLURAL_DETS = ["the", "some", "many", "these", "those", "all the", "two", "three", "five"]
_CONJUNCTIONS = ["and", "but", "because", "so"]

# Every character corpus() can emit, sorted; a constant so that vocab_size (= len(VOCAB)) is known
# to the config without building the data. tests/test_charlm.py checks that a corpus uses exactly
# this set, so a grammar edit that adds a character fails loudly instead of shifting the ids.
VOCAB = "\n !+,-.0123456789=?ADEFMOSTabcdefghijklmnopqrstuvwxyz"
# byte -> id, -1 for a byte no VOCAB character encodes: encode() maps a whole corpus in one lookup
_LUT = torch.full((256,), -1, dtype=torch.int64)
_LUT[torch.tensor(list(VOCAB.encode("ascii")))] = torch.arange(len(VOCAB))


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of ``text``; a character outside VOCAB is an error naming it."""
    # one table lookup over the bytes: a per-character loop took 1 s for the GPT-2 preset's 5.5M
    try:
        raw = bytearray(text.encode("ascii"))
    except UnicodeEncodeError as e:
        raise ValueError(f"character {text[e.start]!r} is not in VOCAB {VOCAB!r}") from None
    if not raw:
        return torch.zeros(0, dtype=torch.int64)
    ids = _LUT[torch.frombuffer(raw, dtype=torch.uint8).long()]
    bad = (ids < 0).nonzero()
    if bad.numel():
        raise ValueError(f"character {text[int(bad[0, 0])]!r} is not in VOCAB {VOCAB!r}")
    return ids


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of a sequence of character ids."""
    return "".join(VOCAB[int(i)] for i in ids)


def _article(det: str, next_word: str) -> str:
    # "a owl" -> "an owl": a dependency on the next word's first letter the model can learn.
    return "an" if det == "a" and next_word[0] in "aeiou" else det


def _noun_phrase(rng: random.Random, plural: bool, depth: int = 0) -> str:
    noun = _NOUNS[rng.randrange(len(_NOUNS))][1 if plural else 0]
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []
    words.append(noun)
    det = rng.choice(_PLURAL_DETS if plural else _SINGULAR_DETS)
    phrase = f"{_article(det, words[0])} {' '.join(words)}"
    if depth == 0 and rng.random() < 0.15:  # relative clause, agreeing with the noun it modifies
        base, third, past = rng.choice(_TRANSITIVE)
        verb = past if rng.random() < 0.3 else (base if plural else third)
        phrase += f" that {verb} {_noun_phrase(rng, rng.random() < 0.4, depth + 1)}"
    elif depth == 0 and rng.random() < 0.1:
        phrase += f" {rng.choice(_PREPOSITIONS)} {_noun_phrase(rng, rng.random() < 0.4, depth + 1)}"
    return phrase


def _clause(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    past = rng.random() < 0.3
    subject = _noun_phrase(rng, plural)
    if rng.random() < 0.65:
        base, third, past_form = rng.choice(_TRANSITIVE)
        verb = past_form if past else (base if plural else third)
        clause = f"{subject} {verb} {_noun_phrase(rng, rng.random() < 0.4)}"
    else:
        base, third, past_form = rng.choice(_INTRANSITIVE)
        verb = past_form if past else (base if plural else third)
        clause = f"{subject} {verb}"
    if rng.random() < 0.3:
        clause += f" {rng.choice(_ADVERBS)}"
    return clause


def _question(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    aux = "did" if rng.random() < 0.3 else ("do" if plural else "does")
    base = rng.choice(_TRANSITIVE)[0]  # after an auxiliary the verb is always the base form
    return f"{aux} {_noun_phrase(rng, plural)} {base} {_noun_phrase(rng, rng.random() < 0.4)}?"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return f"{a}+{b}={a + b}."
    a, b = max(a, b), min(a, b)  # no negative results: '-' only ever means subtraction
    return f"{a}-{b}={a - b}."


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return _arithmetic(rng)
    if r < 0.32:
        s = _question(rng)
    elif r < 0.5:
        s = f"{_clause(rng)}, {rng.choice(_CONJUNCTIONS)} {_clause(rng)}{rng.choice('..!')}"
    else:
        s = f"{_clause(rng)}{'!' if rng.random() < 0.1 else '.'}"
    return s[0].upper() + s[1:]


def corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """Exactly ``n_chars`` characters of generated text, the same for the same ``seed``.

    Paragraphs of 3-8 sentences separated by newlines; every character is in VOCAB. Uses its own
    ``random.Random(seed)``, so the global RNGs are untouched and every rank gets the same text.
    """
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 1:
        raise ValueError(f"n_chars must be a positive integer, got {n_chars!r}")
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) + "\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)[:n_chars]


# ---- data ----------------------------------------------------------------------------------------


def _windows(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Non-overlapping windows; the target of the last position is the next window's first
    # character, so a region of L ids yields (L - 1) // T samples and never reads past its end.
    n = (ids.numel() - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    return x.clone(), y.clone()


def _device(device: str) -> torch.device:
    """datasets(device=...) with an index: the launcher's no-copy path compares the data's device
    with the rank's, and torch.device("cuda") != torch.device("cuda:0")."""
    if device == "auto":  # the rank's GPU (the launcher made it the current one), else the CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; valid: auto, cpu")
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def datasets(
    block_size: int = 64, n_chars: int = 200_000, val_fraction: float = 0.1, seed: int = 0, device: str = "cpu"
) -> tuple[TensorDataset, TensorDataset]:
    """Return (train, val) of (x, y) int64 (N, block_size) windows with y = x shifted by one.

    The split is by position: val is the last round(n_chars * val_fraction) characters, train is
    everything before, and no window crosses the cut, so no validation text is ever trained on.
    ``device`` is where the tensors live: "cpu", "cuda[:N]", or "auto" (the current GPU where CUDA
    is available, else the CPU). On the GPU the launcher slices each batch there, with no
    host-to-device copy per step; the price is the data in GPU memory (16 bytes per character).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    where = _device(device)
    ids = encode(corpus(n_chars, seed))
    cut = n_chars - round(n_chars * val_fraction)
    train, val = _windows(ids[:cut], block_size), _windows(ids[cut:], block_size)
    if train[0].shape[0] == 0 or val[0].shape[0] == 0:
        raise ValueError(
            f"n_chars={n_chars!r} with val_fraction={val_fraction!r} leaves {cut} train and {n_chars - cut} val "
            f"characters; each split needs more than block_size={block_size!r}"
        )
    return TensorDataset(*(t.to(where) for t in train)), TensorDataset(*(t.to(where) for t in val))


# ---- model ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Attention is causal multi-head self-attention through F.scaled_dot_product_attention
    (is_causal=True, so no mask tensor is built); the MLP is 4x wide with GELU.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd!r} must be divisible by n_head={n_head!r}")
        self.n_head, self.dropout = n_head, dropout
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.resid_drop = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        # (N, T, 3C) -> 3 x (N, H, T, C/H); H read from the shape: under tensor parallel a rank's qkv gives
        # its own heads' q, k and v (launcher/device/tensor_parallel.py: colwise_qkv)
        q, k, v = self.qkv(x).view(n, t, 3, -1, c // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.attn_proj(out.transpose(1, 2).reshape(n, t, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_drop(self.attention(self.ln1(x)))
        return x + self.resid_drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over character ids: forward(idx (N, T)) -> logits (N, T, vocab_size).

    Token + learned position embeddings, ``blocks`` (an nn.ModuleList of Block, the FSDP unit),
    a final LayerNorm and an untied linear head. Weights are drawn from the global RNG (the
    launcher seeds it identically on every rank): normal(0, 0.02) for Linear and Embedding
    weights, zero biases. See the module docstring for tokens_per_sample / flops_per_sample.
    """

    def __init__(self, vocab_size: int = len(VOCAB), block_size: int = 64, n_layer: int = 2, n_head: int = 4,
                 n_embd: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init)
        # Embedding tables are lookups (no FLOPs); every other parameter is in a matmul or a norm.
        embedding = self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        self.n_params_non_embedding = sum(p.numel() for p in self.parameters()) - embedding
        self.tokens_per_sample: int = block_size
        # A weight costs 2 FLOPs per token forward and 4 backward: 6 * N * T per sequence. QK^T and
        # attention @ V have no weights: 2 * T * T * C multiply-adds per layer, so 4 * T * T * C
        # FLOPs forward and 12 * T * T * C with backward (counted dense, as if no causal skipping).
        self.flops_per_sample: float = float(
            6 * self.n_params_non_embedding * block_size + 12 * n_layer * n_embd * block_size * block_size
        )

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ---- loss and metric -----------------------------------------------------------------------------


class SeqCrossEntropy(nn.Module):
    """Mean cross-entropy over every position: logits (N, T, V), targets (N, T) int64."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TokenAccuracy:
    """Next-character accuracy over all positions: MulticlassAccuracy(average="micro") on flattened
    (N, T, V) logits and (N, T) targets.

    validate_args=False: torchmetrics' checks count the distinct target values (torch.unique, then
    len()) on every update, a device-to-host sync per training step; the shapes here are ours.
    Built as a subclass at call time so importing the recipe does not import torchmetrics.
    """

    def __new__(cls, vocab_size: int = len(VOCAB)):  # type: ignore[misc]
        from torchmetrics.classification import MulticlassAccuracy

        class _TokenAccuracy(MulticlassAccuracy):
            def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
                super().update(preds.reshape(-1, preds.shape[-1]), target.reshape(-1))

        return _TokenAccuracy(num_classes=vocab_size, average="micro", validate_args=False)
