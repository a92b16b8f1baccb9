"""Two gloo ranks split Hugging Face GPT-2 and Llama models (built from configs) and charlm's GPT with
the launcher's built-in tensor-parallel plans; each rank checks its loss and every gradient against the
same model unsplit. Run by tests/test_mesh.py: python tp_models.py INIT_FILE."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def models() -> dict[str, torch.nn.Module]:
    import transformers

    from launcher.recipes.charlm import GPT

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64, max_position_embeddings=16))
    return {"gpt2": gpt2, "llama": llama, "charlm": GPT(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)}


def loss_of(name: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if name == "charlm":
        return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    return model(input_ids=ids, labels=ids).loss


def mlp_only(model: torch.nn.Module, tp_mesh: object) -> None:
    """A user's own plan (trainer.tp_plan="tp_models:mlp_only"): charlm's MLPs only."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {f"blocks.{i}.mlp.{j}": style for i in range(len(model.blocks))  # type: ignore[arg-type]
            for j, style in ((0, ColwiseParallel()), (2, RowwiseParallel()))}
    parallelize_module(model, tp_mesh, plan)  # type: ignore[arg-type]


def rank(r: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    from launcher.device.tensor_parallel import apply

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    todo = [(name, plain, None) for name, plain in models().items()]
    todo.append(("charlm, the user's function", models()["charlm"], "tp_models:mlp_only"))
    for name, plain, user in todo:
        split = copy.deepcopy(plain)
        plan = apply(split, mesh, user) or {n: "theirs" for n, p in split.named_parameters() if hasattr(p, "placements")}
        assert plan, name
        a, b = loss_of(name.split(",")[0], plain, ids), loss_of(name.split(",")[0], split, ids)
        a.backward()
        b.backward()
        assert torch.allclose(a, b, atol=1e-5), (name, a.item(), b.item())
        grads = dict(plain.named_parameters())
        for n, p in split.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            assert torch.allclose(g, grads[n].grad, atol=1e-5), (name, n)
        print(f"rank {r} {name}: loss {b.item():.6f} equal, {len(plan)} modules split", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1],), nprocs=2)
