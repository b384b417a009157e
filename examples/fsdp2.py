"""FSDP2 (``fully_shard``) with bf16 compute, exact fp32 accumulation and a mid-window checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2.py          # CPU, gloo (NCCL on GPUs: same code)

fastaccum's buffers hold each rank's shards; the clip norm is the global one and the
token-weighted mean is exact across ranks. FSDP2 reduce-scatters every micro-batch here, so
the partial sums live in fastaccum's sharded buffers and a checkpoint taken inside a window
(torch.distributed.checkpoint) resumes exactly. To reduce-scatter once per window instead,
call ``model.set_requires_gradient_sync(opt.sync_gradients)`` and checkpoint at window ends.
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fastaccum

ACCUM = 4


def build(device_type: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = fastaccum.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, accumulation_steps=ACCUM,
                          max_grad_norm=1.0)
    return model, opt


def batches(rank: int, count: int):
    g = torch.Generator().manual_seed(1234 + rank)
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    for _ in range(count):
        n = int(torch.randint(4, 33, (1,), generator=g))
        x = torch.randn(n, 32, generator=g)
        yield x, x @ target


def train(model, opt, data, device):
    for x, y in data:
        model.set_requires_gradient_sync(True)  # or opt.sync_gradients: once per window
        loss = (model(x.to(device)) - y.to(device)).pow(2).mean()
        opt.backward(loss, weight=x.shape[0])
        opt.step()
        opt.zero_grad()
    return loss


def main(updates: int = 10) -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    data = list(batches(rank, updates * ACCUM))
    cut = (updates // 2) * ACCUM + 1  # inside a window

    model, opt = build(device.type if isinstance(device, torch.device) else device)
    loss = train(model, opt, data, device)
    straight = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        print(f"uninterrupted: {updates} updates, last loss {loss.item():.4f}", flush=True)

    ckpt = tempfile.mkdtemp() if rank == 0 else None
    box = [ckpt]
    dist.broadcast_object_list(box)
    model, opt = build(device.type if isinstance(device, torch.device) else device)
    train(model, opt, data[:cut], device)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=box[0])

    model, opt = build(device.type if isinstance(device, torch.device) else device)  # a fresh start
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=box[0])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.micro_step == cut % ACCUM
    train(model, opt, data[cut:], device)
    resumed = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resumed run differs"
    if rank == 0:
        print(f"ok: checkpoint at micro-batch {cut % ACCUM} of a window resumed bit for bit", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
