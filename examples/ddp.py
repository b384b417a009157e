"""bf16 parameters under DDP with exact fp32 accumulation.

    torchrun --nproc_per_node=2 examples/ddp.py            # CPU, gloo (NCCL on GPUs: same code)

The loop is the one-device loop: ``no_sync()`` unless ``opt.sync_gradients``,
``opt.backward(loss, weight=n_tokens)``, ``opt.step()``. The one extra line registers
fastaccum's communication hook, so that DDP averages the fp32 accumulation buffer (once per
window, while backward runs) instead of bf16 gradients.
"""
import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init_process_group: see the end of main)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum


def main(steps: int = 20, accumulation_steps: int = 4) -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)).to(device, torch.bfloat16)
    ddp = DDP(model)
    opt = fastaccum.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01,
                          accumulation_steps=accumulation_steps, max_grad_norm=1.0)
    ddp.register_comm_hook(opt, fastaccum.ddp_comm_hook)

    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    for step in range(steps * accumulation_steps):
        n = int(torch.randint(4, 33, (1,), generator=g))  # micro-batches of unequal size
        x = torch.randn(n, 32, generator=g)
        y = x @ target
        with ddp.no_sync() if not opt.sync_gradients else contextlib.nullcontext():
            loss = (ddp(x.to(device, torch.bfloat16)).float() - y.to(device)).pow(2).mean()
            opt.backward(loss, weight=n)  # mean over this micro-batch's samples, weighted by their count
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0 and rank == 0 and (step + 1) % (5 * accumulation_steps) == 0:
            print(f"update {(step + 1) // accumulation_steps}: loss {loss.item():.4f}", flush=True)

    # every rank holds the same fp32 masters, bit for bit
    master = torch.cat([opt.state[p]["master_param"].reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(master) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, master)
    assert all(torch.equal(copies[0], c) for c in copies), "replicas drifted apart"
    if rank == 0:
        print("ok: replicas agree", flush=True)
    # A clean exit: gloo's worker threads free a finished collective's tensors a moment after
    # the caller's wait() returns. If that happens once Python is shutting down (the tensors'
    # Python objects gone), the thread cannot take the GIL and the process aborts
    # ("terminate called without an active exception"). So the process group is destroyed
    # here, which joins those threads while every tensor is still alive. That needs the last
    # reference to it gone: DDP holds one, and torch.distributed.nn's functions keep the
    # default group as a default argument when that module is first imported after
    # init_process_group (DDP imports it), hence its import at the top.
    dist.barrier()
    del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
