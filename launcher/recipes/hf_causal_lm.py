"""Hugging Face causal LM recipe: a small GPT-2 from transformers, trained with the model's own loss.

What it shows: a model the launcher did not write (``transformers.GPT2LMHeadModel``) trained as
it is, its batches the dicts Hugging Face models take (``input_ids``, ``attention_mask``,
``labels``), the loss the model computes itself (``step: ModelLoss`` in the YAML), and an export
that Hugging Face loads back (``python -m launcher export RUN_DIR OUT_DIR --format hf``).

Nothing is downloaded. The model is built from a ``GPT2Config`` (random weights drawn from the
global RNG, which the launcher seeds the same on every rank); the tokenizer is a byte-level one
written here (the 256 byte values, then pad / bos / eos); the text is charlm's seeded grammar
(``launcher.recipes.charlm.corpus``) or a UTF-8 file the config names. The code takes no path
that reaches the Hub, so it runs the same under HF_HUB_OFFLINE=1.

Samples have variable length: the text is split into sentences (and lines), each becomes
``[bos] + bytes + [eos]`` cut to ``max_len`` tokens, and ``PadCollate`` pads a batch to its
longest sample, with ``labels`` = -100 on padding (the value Hugging Face's loss ignores). A
collate needs a DataLoader, so ``data`` returns two; the launcher re-shards them over ranks
(launcher/fit/data.py takes their batch size, sampler kind and collate).

transformers is imported inside the functions that need it: the parent imports every
``_target_``'s module to check it, and that check must not pay ~2 s for transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["PAD", "BOS", "EOS", "VOCAB_SIZE", "IGNORE", "encode", "decode", "split_text", "TextSamples",
           "PadCollate", "data", "model"]

# ---- the byte-level tokenizer --------------------------------------------------------------------

PAD, BOS, EOS = 256, 257, 258  # ids past the byte values, so any UTF-8 text encodes without an unknown token
VOCAB_SIZE = 259
IGNORE = -100  # the label torch's cross_entropy (and so every Hugging Face loss) leaves out


def encode(text: str, max_len: Optional[int] = None) -> list[int]:
    """``[BOS] + the UTF-8 bytes of text + [EOS]``, cut to ``max_len`` ids (the EOS goes first)."""
    ids = [BOS, *text.encode("utf-8"), EOS]
    return ids if max_len is None else ids[:max_len]


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of ids; pad / bos / eos are dropped, a multi-byte character cut in two is replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# A sentence ends at . ! ? followed by white space; a line break ends one too. The grammar's
# sentences are 6 to 169 characters (mean 42): the batches really have mixed lengths.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


def split_text(text: str) -> list[str]:
    """The non-empty sentences (and lines) of ``text``, in order."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


# ---- data ----------------------------------------------------------------------------------------


class TextSamples(Dataset):
    """One int64 tensor of token ids per sample, of its own length (from 3 to ``max_len``)."""

    def __init__(self, texts: list[str], max_len: int) -> None:
        self.samples = [torch.tensor(encode(t, max_len), dtype=torch.int64) for t in texts]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.samples[i]


class PadCollate:
    """Pads a list of id tensors to the longest: ``{input_ids, attention_mask, labels}``, each (N, T).

    Right padding: GPT-2's positions count from the left, so a sample's positions are the same
    whatever it is batched with. ``labels`` are the ids (the model shifts them itself) with
    IGNORE where the mask is 0, so padding never counts in the loss or in token accuracy.
    A class, not a closure: DataLoader workers (num_workers > 0) pickle it.
    """

    def __init__(self, pad_id: int = PAD) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in samples])
        ids = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=self.pad_id)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(torch.int64)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def _text(path: Optional[str], n_chars: int, seed: int) -> str:
    if path is None:
        from .charlm import corpus  # the same seeded grammar charlm trains on: no download, no borrowed prose

        return corpus(n_chars, seed)
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"path={path!r}: cannot be read as UTF-8 text ({e})") from None


def data(batch_size: int, max_len: int = 128, n_chars: int = 200_000, val_fraction: float = 0.1, seed: int = 0,
         path: Optional[str] = None, num_workers: int = 0, eval_batch_size: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, val) DataLoaders of padded dict batches over the sentences of a text.

    The text is ``path`` (a UTF-8 file) when given, else ``n_chars`` characters of charlm's
    grammar from ``seed``. The split is by position: val is the last ``val_fraction`` of the
    sentences, never trained on. Train is shuffled (a RandomSampler: the launcher replaces it
    with its own seeded, sharded order), val is in order. ``batch_size`` is per rank, val's is
    ``eval_batch_size`` or the same; the launcher takes a DataLoader's own, so the recipe's YAML
    passes ``${trainer.batch_size}`` and ``${trainer.eval_batch_size}`` (and the worker count).
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 3:  # bos + 1 byte + eos at least
            raise ValueError(f"{name} must be an integer >= 3, got {value!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    texts = split_text(_text(path, n_chars, seed))
    n_val = round(len(texts) * val_fraction)
    if n_val < 1 or n_val >= len(texts):
        raise ValueError(f"{len(texts)} sentences with val_fraction={val_fraction!r} leave {len(texts) - n_val} "
                         f"train and {n_val} val samples; each split needs at least one (more text: n_chars or path)")
    train, val = TextSamples(texts[:-n_val], max_len), TextSamples(texts[-n_val:], max_len)
    kw = {"collate_fn": PadCollate(), "num_workers": num_workers}
    return (DataLoader(train, batch_size=batch_size, shuffle=True, **kw),
            DataLoader(val, batch_size=eval_batch_size or batch_size, shuffle=False, **kw))


# ---- model ---------------------------------------------------------------------------------------


def model(n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_positions: int = 128, dropout: float = 0.0,
          attn_implementation: str = "sdpa", **config: Any) -> Any:
    """A randomly initialised ``transformers.GPT2LMHeadModel`` for the byte vocabulary.

    Its repeated unit is ``GPT2Block`` (trainer.fsdp_wrap). The LM head is tied to the token
    embedding, as in GPT-2; both sit outside the blocks, in FSDP's root unit, so the tie holds
    when sharded. ``attn_implementation``: "sdpa" (torch's scaled_dot_product_attention) or
    "eager" (HF's matmul-softmax): both give bitwise-repeatable results on CPU at a fixed thread
    count (tests/test_hf.py resumes bitwise under sdpa), sdpa is the faster. Other keywords go
    to ``GPT2Config`` as they are (e.g. ``n_inner``, ``activation_function``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # lazy: see the module docstring

    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=BOS,
                     eos_token_id=EOS, pad_token_id=PAD, attn_implementation=attn_implementation, **config)
    net = GPT2LMHeadModel(cfg)
    # transformers picks the loss from the class name, finds none in "GPT2LMHeadModel", warns (once
    # per rank) and takes the causal LM loss anyway: naming it keeps every rank's log quiet
    net.loss_type = "ForCausalLM"
    return net
