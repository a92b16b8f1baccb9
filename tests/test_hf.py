"""The Hugging Face recipe (launcher/recipes/hf_causal_lm.py) and `export --format hf`.

Fast: the byte tokenizer, the padding collate, the variable-length data, the model and the
ModelLoss step's token count, a short in-process fit. Slow (the CLI, 1 and 2 CPU ranks): a run
exported with save_pretrained loads with from_pretrained and gives the run's logits; 2 FSDP ranks
accumulating 2 micro-batches, SIGKILLed mid-epoch and run again, end bitwise where an
uninterrupted run does, and the sharded checkpoint exports too. Every run is offline
(HF_HUB_OFFLINE=1): nothing may reach the Hub.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import QUIET, cli_env, run_cli, wait_for_file  # noqa: E402
from launcher.recipes import hf_causal_lm as R  # noqa: E402
from launcher.recipes.charlm import corpus  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _own_rng():  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):  # the tests seed the global RNG; the next test gets it back
        yield


def _batch(*texts: str) -> dict[str, torch.Tensor]:
    return R.PadCollate()([torch.tensor(R.encode(t)) for t in texts])


# ---- fast: tokenizer, collate, data, model, step ------------------------------------------------

def test_bytes_round_trip_and_specials_are_past_the_bytes() -> None:
    text = "Zoë sees 17+25=42."  # a 2-byte character: byte-level ids need no unknown token
    ids = R.encode(text)
    assert ids[0] == R.BOS and ids[-1] == R.EOS and len(ids) == len(text.encode("utf-8")) + 2
    assert R.decode(ids) == text and max(ids) < R.VOCAB_SIZE
    assert R.encode(text, max_len=5) == ids[:5]  # cut: the EOS goes first


def test_collate_pads_to_the_longest_and_labels_ignore_the_padding() -> None:
    b = _batch("A cat.", "The big dog sleeps.")
    n_short, n_long = len(R.encode("A cat.")), len(R.encode("The big dog sleeps."))
    assert b["input_ids"].shape == (2, n_long) and b["input_ids"].dtype == torch.int64
    assert b["attention_mask"].sum(1).tolist() == [n_short, n_long]
    assert (b["input_ids"][0, n_short:] == R.PAD).all() and (b["labels"][0, n_short:] == R.IGNORE).all()
    assert torch.equal(b["labels"][1], b["input_ids"][1])  # the model shifts the labels itself


def test_data_is_variable_length_sentences_split_by_position() -> None:
    train, val = R.data(batch_size=8, n_chars=20_000, max_len=32)
    lengths = [len(s) for s in train.dataset.samples]
    assert min(lengths) < 16 and max(lengths) == 32  # mixed lengths, the longest cut to max_len
    assert len(val.dataset) == round((len(train.dataset) + len(val.dataset)) * 0.1)
    last = R.split_text(corpus(20_000, 0))[-1]
    assert torch.equal(val.dataset[len(val.dataset) - 1], torch.tensor(R.encode(last, 32)))  # val is the text's end
    assert train.batch_size == val.batch_size == 8 and isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert R.data(batch_size=8, n_chars=20_000, eval_batch_size=20)[1].batch_size == 20  # trainer.eval_batch_size
    with pytest.raises(ValueError, match="val_fraction"):
        R.data(batch_size=8, val_fraction=1.0)


def test_data_reads_a_text_file(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("One line.\nTwo lines! Three?\n" * 5, encoding="utf-8")
    train, val = R.data(batch_size=4, path=str(tmp_path / "t.txt"), val_fraction=0.2)
    assert (len(train.dataset), len(val.dataset)) == (12, 3)
    with pytest.raises(ValueError, match="cannot be read"):
        R.data(batch_size=4, path=str(tmp_path / "missing.txt"))


def test_model_loss_step_weights_the_model_loss_by_its_real_tokens() -> None:
    from launcher import ModelLoss

    torch.manual_seed(0)
    net = R.model()
    assert "GPT2Block" in {type(m).__name__ for m in net.modules()}  # trainer.fsdp_wrap names it
    assert net.lm_head.weight is net.transformer.wte.weight
    b = _batch("A cat.", "The big dog sleeps.")
    out = ModelLoss(shift_labels=True, per_token=True)(net, b)
    real = int(b["attention_mask"][:, 1:].sum())  # every real token but the first of each sample is a target
    assert int(out.count) == real and out.targets.shape == (real + int((b["labels"][:, 1:] == R.IGNORE).sum()),)
    logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                ignore_index=R.IGNORE, reduction="sum")
    torch.testing.assert_close(out.loss, by_hand)
    assert out.outputs.shape == (out.targets.shape[0], R.VOCAB_SIZE)


def test_a_short_fit_in_process_learns(tmp_path: Path) -> None:
    from torchmetrics.classification import MulticlassAccuracy

    from launcher import ModelLoss, Trainer

    torch.manual_seed(0)
    net = R.model()
    train, val = R.data(batch_size=16, n_chars=20_000)
    acc = MulticlassAccuracy(num_classes=R.VOCAB_SIZE, ignore_index=R.IGNORE, average="micro", validate_args=False)
    history = Trainer(max_steps=30, max_epochs=5, precision="32", run_dir=tmp_path / "run", progress=False,
                      logger="none").fit(net, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), train_data=train,
                                         val_data=val, metrics={"acc": acc}, step=ModelLoss(shift_labels=True,
                                                                                            per_token=True))
    last = history[-1]
    assert last["val_loss"] < math.log(R.VOCAB_SIZE) - 1.5, last  # uniform guessing: ln 259 = 5.56
    assert 0.2 < last["val_acc"] <= 1.0, last


# ---- slow: the CLI, export, 2 FSDP ranks killed and resumed -------------------------------------

def _same_logits(run_dir: Path, exported: Path) -> None:
    """from_pretrained(exported) gives bitwise the logits of the run's model.pt in a fresh model."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(exported).eval()
    ref = R.model()
    ref.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    b = _batch("Some cats see the owl.", "17+25=42.")
    with torch.no_grad():
        want = ref.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(got, want)


def _export(run_dir: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "export", str(run_dir), str(out), "--format", "hf"],
                          cwd=cwd, env=cli_env(**OFFLINE), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_one_rank_run_exports_what_from_pretrained_loads(tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    p = run_cli(["recipe=hf_causal_lm", "data.n_chars=20000", "trainer.max_steps=20", *QUIET, f"run.dir={run_dir}"],
                cwd=tmp_path, **OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(run_dir / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["val_loss"]) < math.log(R.VOCAB_SIZE) and float(row["val_acc"]) > 0, row
    p = _export(run_dir, out, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    _same_logits(run_dir, out)


@pytest.mark.slow
def test_export_hf_of_a_model_without_save_pretrained_is_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "lin"
    p = run_cli(["recipe=linreg", "trainer.max_epochs=1", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _export(run_dir, tmp_path / "hf", tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "launcher.export: error: --format hf: the model (launcher.recipes.linreg.Net, a Linear) has no save_pretrained;"
        " valid: a Hugging Face PreTrainedModel, or the default format (a state_dict file)"], p.stderr
    assert not (tmp_path / "hf").exists()


def _fsdp_args(run_dir: Path) -> list[str]:
    # 40k characters: 846 train sentences, 2 ranks x 2 micro-batches of 32 -> 7 steps per epoch; a checkpoint
    # every 3 steps, so step 9 is inside epoch 2 (steps 8-14)
    return ["recipe=hf_causal_lm", "data.n_chars=40000", "trainer.gpus=0",
            "trainer.nproc=2", "trainer.strategy=fsdp", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=2",
            "trainer.max_steps=-1", "checkpoint.every_n_steps=3", *QUIET, f"run.dir={run_dir}"]


@pytest.mark.slow
def test_two_fsdp_ranks_accumulating_killed_then_resumed_is_bitwise_and_exports(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli(_fsdp_args(ref), cwd=tmp_path, **OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "-m", "launcher", *_fsdp_args(cut)], cwd=tmp_path, env=cli_env(**OFFLINE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_file(cut / "checkpoints" / "step-0000009" / "manifest.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait(timeout=30)
    assert not (cut / "model.pt").exists(), "the run must really have been cut short"
    again = run_cli(_fsdp_args(cut), cwd=tmp_path, **OFFLINE)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in (cut / "logs" / "rank-0.log").read_text().splitlines() if "resumed from" in ln]
    assert resumed and "epoch 2 at batch" in resumed[-1] and "at batch 0" not in resumed[-1], resumed

    a, b = torch.load(ref / "model.pt", weights_only=True), torch.load(cut / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after the resume"
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()

    p = _export(cut, tmp_path / "hf", tmp_path)  # the FSDP shards, reassembled
    assert p.returncode == 0, p.stderr[-3000:]
    _same_logits(cut, tmp_path / "hf")
