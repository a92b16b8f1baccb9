"""Memory for big models (docs/big-models.md): activation checkpointing and FSDP2's knobs.

Fast: checkpointing the charlm, GPT-2 and Llama blocks gives gradients bitwise those without it (with
dropout: the RNG is replayed), really recomputes the chosen blocks and keeps the state_dict's names;
the keys' checks are one line naming field and value; strategy.wrap in a gloo group of one hands
the knobs to fully_shard (read back from FSDP's own state, and seen in the forward). Slow (the CLI, 2 gloo ranks):
every knob together with checkpointing (and an EMA of the weights) trains, is SIGKILLed mid-epoch and the same command resumes
bitwise where an uninterrupted run ends. (DDP and compile with checkpointing: tests/test_scale.py's
ddp and compile runs.)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from conftest import killed_then_resumed, rows, run_cli
from launcher import config as C
from launcher.config.memory import ac_rule
from launcher.device.memory import checkpoint_blocks
from launcher.recipes import charlm


@pytest.fixture(autouse=True)
def _own_rng():  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        yield


def _grads(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for both: what checkpointing must replay in its recompute
    loss(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _bitwise_with_and_without(model: nn.Module, spec: Any, loss: Callable[[nn.Module], torch.Tensor],
                              block: type) -> int:
    """Checkpoint a copy of `model` by `spec`: bitwise gradients, the same state_dict names; returns
    how many blocks ran their forward twice (the recompute: proof that checkpointing is on)."""
    ac = copy.deepcopy(model)
    wrapped = checkpoint_blocks(ac, spec)
    calls: dict[int, int] = {}
    for m in ac.modules():
        if isinstance(m, block):
            m.register_forward_pre_hook(lambda mod, _: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
    want, got = _grads(model, loss), _grads(ac, loss)
    names = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in got.items()}
    assert names.keys() == want.keys() and all(torch.equal(want[n], names[n]) for n in want)
    assert list(ac.state_dict()) == list(model.state_dict())  # checkpoints keep the plain names
    ac.load_state_dict(model.state_dict())
    recomputed = sum(c == 2 for c in calls.values())
    assert recomputed == len(wrapped) and sum(c == 1 for c in calls.values()) == len(calls) - len(wrapped)
    return recomputed


def _charlm_loss(m: nn.Module) -> torch.Tensor:
    x = torch.randint(0, len(charlm.VOCAB), (4, 32), generator=torch.Generator().manual_seed(0))
    return charlm.SeqCrossEntropy()(m(x), x.roll(-1, 1))


def test_checkpointed_charlm_blocks_give_bitwise_gradients() -> None:
    torch.manual_seed(0)
    net = charlm.GPT(block_size=32, n_layer=4, n_embd=32, dropout=0.1)
    assert _bitwise_with_and_without(net, ["Block"], _charlm_loss, charlm.Block) == 4
    assert _bitwise_with_and_without(net, {"Block": 2}, _charlm_loss, charlm.Block) == 2  # the 2nd and 4th


def test_checkpointed_hugging_face_gpt2_and_llama_blocks_give_bitwise_gradients() -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from launcher.recipes import hf_causal_lm as R

    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))

    def loss(m: nn.Module) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    torch.manual_seed(0)
    gpt2 = R.model(n_layer=2, dropout=0.1).train()
    assert _bitwise_with_and_without(gpt2, ["GPT2Block"], loss, GPT2Block) == 2
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                                         max_position_embeddings=64)).train()
    assert _bitwise_with_and_without(llama, {"LlamaDecoderLayer": 3}, loss, LlamaDecoderLayer) == 1


def test_an_unknown_block_class_is_one_line_naming_the_model_classes() -> None:
    with pytest.raises(C.UserError) as e:
        checkpoint_blocks(charlm.GPT(n_layer=1), ["Blok"])
    assert str(e.value) == ("trainer.activation_checkpointing='Blok': no such module class in the model (below its "
                            "root); valid: Block, Dropout, Embedding, GELU, LayerNorm, Linear, ModuleList, Sequential")


# (trainer fields, the one line's start)
BAD = [
    ({"activation_checkpointing": 3}, "trainer.activation_checkpointing=3: not a block rule; valid: off, a block"),
    ({"activation_checkpointing": ["my.Block"]}, "trainer.activation_checkpointing=['my.Block']: 'my.Block' is not a "
                                                 "class name"),
    ({"activation_checkpointing": {"Block": 0}}, "trainer.activation_checkpointing={'Block': 0}: every 0-th Block: "
                                                 "k must be an integer >= 1"),
    ({"strategy": "fsdp", "fsdp_reshard_after_forward": 1}, "trainer.fsdp_reshard_after_forward=1: reshard after "
                                                            "forward; valid: true"),
    ({"strategy": "fsdp", "fsdp_cpu_offload": "yes"}, "trainer.fsdp_cpu_offload='yes': must be true or false"),
    ({"strategy": "fsdp", "fsdp_param_dtype": "fp8"}, "trainer.fsdp_param_dtype='fp8': unknown dtype; valid: auto, "
                                                      "float32, bfloat16"),
    ({"strategy": "ddp", "fsdp_cpu_offload": True}, "trainer.fsdp_cpu_offload=True: applies to sharded runs only "
                                                    "(trainer.strategy=ddp); valid: trainer.strategy=fsdp"),
    ({"strategy": "fsdp", "precision": "32", "fsdp_param_dtype": "bfloat16"},
     "trainer.fsdp_param_dtype='bfloat16': computes in bf16 but trainer.precision=32 asks for float32"),
    ({"strategy": "fsdp", "precision": "bf16-true", "fsdp_param_dtype": "float32"},
     "trainer.fsdp_param_dtype='float32': trainer.precision=bf16-true keeps the parameters in bf16"),
]


@pytest.mark.parametrize("fields,expected", BAD, ids=[str(f) for f, _ in BAD])
def test_bad_memory_keys_are_one_line_naming_field_and_value(fields: dict, expected: str) -> None:
    with pytest.raises(C.ConfigError) as e:
        C.check_trainer(C.TrainerConfig(**fields))
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_good_memory_keys_pass_and_an_int_reshard_must_divide_the_ranks() -> None:
    for fields in ({"activation_checkpointing": "off"}, {"activation_checkpointing": None},
                   {"activation_checkpointing": False}, {"activation_checkpointing": {"Block": 2, "GPT2Block": 1}},
                   {"strategy": "fsdp", "fsdp_reshard_after_forward": 2, "fsdp_cpu_offload": True,
                    "precision": "bf16-mixed", "fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "float32"}):
        C.check_trainer(C.TrainerConfig(**fields))
    assert ac_rule("Block") == ac_rule(["Block"]) == ac_rule({"Block": 1}) == {"Block": 1} and ac_rule("off") is None
    cfg = C.Config(trainer=C.TrainerConfig(strategy="fsdp", gpus=0, nproc=4, fsdp_reshard_after_forward=2))
    C.check(cfg)
    cfg.trainer.nproc = 6
    with pytest.raises(C.ConfigError, match=r"fsdp_reshard_after_forward=4: must divide the 6 sharding rank"):
        cfg.trainer.fsdp_reshard_after_forward = 4
        C.check(cfg)


@pytest.fixture
def one_rank_group(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A gloo process group of one in this process (FSDP2 needs a group), gone after the test."""
    import torch.distributed as td

    td.init_process_group("gloo", store=td.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        td.destroy_process_group()


def test_fsdp_knobs_reach_fully_shard_and_the_checkpointed_blocks_are_its_units(one_rank_group: None) -> None:
    """strategy.wrap as a fit calls it: FSDP's own state holds the policies; the forward computes with
    bf16 parameters gathered from float32 shards; the blocks stay whole (keep their gathered
    parameters after forward); the checkpoint wrappers, not the blocks inside, are the FSDP units."""
    from launcher.device import strategy as S
    from launcher.device.dist import Dist
    from launcher.device.memory import fsdp_options

    t = C.TrainerConfig(strategy="fsdp", precision="bf16-mixed", fsdp_param_dtype="bfloat16",
                        fsdp_reduce_dtype="float32", fsdp_cpu_offload=True, fsdp_reshard_after_forward=False)
    C.check_trainer(t)
    torch.manual_seed(0)
    net = charlm.GPT(block_size=32, n_layer=2, n_embd=32)
    S.wrap(net, "fsdp", Dist(), ["Block"], False, False, {"Block": 2}, fsdp_options(t, "bf16-mixed", torch.device("cpu")))
    units = [type(b).__name__ for b in net.blocks]
    assert units == ["FSDPBlock", "FSDPCheckpointWrapper"], units  # the 2nd block checkpointed, sharded as the unit
    group = net.blocks[1]._get_fsdp_state()._fsdp_param_group
    assert group.mp_policy.param_dtype == torch.bfloat16 and group.mp_policy.reduce_dtype == torch.float32
    assert type(group.offload_policy).__name__ == "CPUOffloadPolicy" and not group.offload_policy.pin_memory
    seen: list[torch.dtype] = []
    net.blocks[0].qkv.register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
    loss = _charlm_loss(net)
    kept = net.blocks[0].qkv.weight  # reshard_after_forward=false: the gathered bf16 weight stays registered
    assert seen == [torch.bfloat16] and type(kept) is nn.Parameter and kept.dtype == torch.bfloat16
    loss.backward()
    assert type(net.blocks[0].qkv.weight).__name__ == "DTensor" and net.blocks[0].qkv.weight.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(C.UserError, match=r"fsdp_param_dtype='bfloat16': computes in bf16 but trainer.precision=32 "
                                          r"asks for float32.* \(trainer.precision=auto resolved to 32 here\)"):
        fsdp_options(C.TrainerConfig(strategy="fsdp", fsdp_param_dtype="bfloat16"), "32", torch.device("cpu"))


def _knobs_args(run_dir: Path) -> list[str]:
    # charlm with dropout (the recompute must replay its masks), every memory key at a value other than
    # its default; 12k characters: 3 optimizer steps per epoch on 2 ranks, a checkpoint every 2 steps
    return ["recipe=charlm", "data.n_chars=12000", "model.dropout=0.1", "trainer.max_steps=-1", "trainer.max_epochs=2",
            "trainer.gpus=0", "trainer.nproc=2", "trainer.strategy=fsdp", "trainer.precision=bf16-mixed",
            "trainer.fsdp_param_dtype=bfloat16", "trainer.fsdp_reduce_dtype=float32", "trainer.fsdp_cpu_offload=true",
            "trainer.fsdp_reshard_after_forward=false", "trainer.activation_checkpointing={Block:2}",
            "trainer.ema_decay=0.9", "trainer.log_every_n_steps=0", "trainer.progress=false", "checkpoint.every_n_steps=2", f"run.dir={run_dir}"]


@pytest.mark.slow
def test_every_knob_with_checkpointing_trains_killed_then_resumed_bitwise(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli(_knobs_args(ref), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (ref / "logs" / "rank-0.log").read_text()
    assert ("activation checkpointing on 1 block(s), fully_shard(reshard_after_forward=False, offload_policy="
            "CPUOffloadPolicy(pin_memory=False), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
            "reduce_dtype=torch.float32") in log, log
    rows = (ref / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and float(rows[2].split(",")[5]) < float(rows[1].split(",")[5]), rows  # val_loss falls

    resumed = killed_then_resumed(_knobs_args(cut), cut, 4, tmp_path)  # step 4: inside epoch 2 (steps 4-6)
    assert "epoch 2 at batch" in resumed and "at batch 0" not in resumed, resumed
    a, b = torch.load(ref / "model.pt", weights_only=True), torch.load(cut / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after the resume"
    assert "_checkpoint_wrapped_module" not in "".join(a) and a["blocks.0.qkv.weight"].dtype == torch.float32
    ema = [torch.load(r / "model-ema.pt", weights_only=True) for r in (ref, cut)]  # its names are the model's too
    assert ema[0].keys() == a.keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in a)
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()


@pytest.mark.slow
def test_reshard_over_groups_of_two_of_four_ranks_trains_and_resumes(tmp_path: Path) -> None:
    """The int form of trainer.fsdp_reshard_after_forward needs a shard group of 4 ranks or more: 4
    gloo ranks reshard over pairs after forward, train, and a longer limit continues from the checkpoint."""
    run_dir = tmp_path / "r"
    args = ["recipe=charlm", "data.n_chars=12000", "trainer.gpus=0", "trainer.nproc=4", "trainer.strategy=fsdp",
            "trainer.fsdp_reshard_after_forward=2", "trainer.precision=32", "trainer.progress=false",
            "trainer.summary=false", "trainer.max_epochs=1", f"run.dir={run_dir}"]
    p = run_cli(args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fully_shard(reshard_after_forward=2" in (run_dir / "logs" / "rank-0.log").read_text()
    p = run_cli([*args[:-2], "trainer.max_epochs=2", f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in (run_dir / "logs" / "rank-0.log").read_text()
    losses = [float(r["train_loss"]) for r in rows(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0], losses

