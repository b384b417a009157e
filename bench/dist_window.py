"""Per-window time and bytes on the wire for 2 gloo ranks: fastaccum vs torch.optim.AdamW(fused=True)
under the same DDP / FSDP2 setup and the same accumulation. A measurement, not a test.

    python bench/dist_window.py [--params 4M] [--accum 4] [--windows 6]

The two optimizers' windows alternate (each on its own model, ABBA order), and the ratio
columns are medians of fastaccum's window over its neighbouring torch window: the machine's
load drifts, and neighbouring windows see about the same. Wall time includes waiting for the
other rank (gloo over loopback, shared cores); CPU time (rank 0's process time) does not, so
it shows what each optimizer itself costs.

Bytes are each rank's payload per window, counted from what each setup reduces (the ring
algorithm then puts 2(W-1)/W of an all-reduce payload and (W-1)/W of a reduce-scatter or
all-gather payload on each link):
  DDP            all-reduce of the gradients once per window (no_sync inside it)
  FSDP2          per micro-batch: all-gather of the parameters for forward (and again for
                 backward); once per window: reduce-scatter of the gradients
  fastaccum adds one all-reduce of 3 float64 numbers per window (weight sum, found-inf,
  squared norm of the shards).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastaccum  # noqa: E402

WORLD = 2


def model_of(n_params: int, width: int = 1024) -> nn.Module:
    depth = max(1, n_params // (width * width))
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def build(rank, setup, opt_kind, args):
    """One (setup, optimizer) pair: returns a function that runs one accumulation window."""
    torch.manual_seed(0)
    model = model_of(args.params)
    n = sum(p.numel() for p in model.parameters())
    low = setup == "ddp-bf16"
    if low:
        model = model.to(torch.bfloat16)
    if setup.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh, mp_policy=policy)
        wrapped = fully_shard(model, mesh=mesh, mp_policy=policy)
    if opt_kind == "fastaccum":
        opt = fastaccum.AdamW(wrapped.parameters(), lr=1e-4, accumulation_steps=args.accum, max_grad_norm=1.0)
        if setup.startswith("ddp"):
            if low:
                wrapped.register_comm_hook(opt, fastaccum.ddp_comm_hook)
        sync = lambda k: opt.sync_gradients  # noqa: E731
    else:
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, fused=True)
        sync = lambda k: (k + 1) % args.accum == 0  # noqa: E731
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(args.micro, 1024, generator=g) for _ in range(args.accum)]
    if low:
        xs = [x.to(torch.bfloat16) for x in xs]

    def window() -> tuple:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for k, x in enumerate(xs):
            if setup.startswith("ddp"):
                ctx = wrapped.no_sync() if not sync(k) else contextlib.nullcontext()
            else:
                wrapped.set_requires_gradient_sync(sync(k))
                ctx = contextlib.nullcontext()
            with ctx:
                loss = wrapped(x).float().pow(2).mean()
                if opt_kind == "fastaccum":
                    opt.backward(loss, weight=x.shape[0])
                else:
                    (loss / args.accum).backward()
            if opt_kind == "fastaccum":
                opt.step()
                opt.zero_grad()
            elif sync(k):
                torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        t1, c1 = time.perf_counter(), time.process_time()  # (the closing barrier waits for the slower rank)
        dist.barrier()
        return t1 - t0, c1 - c0

    if setup.startswith("ddp"):
        grad_bytes = 4 if (opt_kind == "fastaccum" or not low) else 2
        wire = {"all-reduce": n * grad_bytes}
    else:
        wire = {"all-gather (fwd+bwd, bf16)": 2 * args.accum * n * 2, "reduce-scatter (fp32)": n * 4}
    if opt_kind == "fastaccum":
        wire["small all-reduce"] = 24
    info = {"setup": setup, "optimizer": opt_kind, "params": n, "payload_bytes_per_rank": wire}
    return window, info


def run_setup(rank, setup, args):
    """Both optimizers on the same setup, their windows alternating (torch, fastaccum, torch, ...):
    the machine's load changes slowly, so each pair of neighbouring windows sees about the same."""
    kinds = ["fastaccum"] if setup == "ddp-bf16" else ["torch-fused", "fastaccum"]
    # (torch.optim would reduce and accumulate bf16 gradients under ddp-bf16: not the same run)
    runs = [build(rank, setup, kind, args) for kind in kinds]
    for window, _ in runs:
        window()  # the first window warms up (buffers, state, buckets)
    times = {kind: [] for kind in kinds}
    cpu = {kind: [] for kind in kinds}
    for w in range(args.windows):
        order = list(zip(kinds, runs))
        for kind, (window, _) in order if w % 2 == 0 else order[::-1]:  # ABBA: no side always goes first
            t, c = window()
            times[kind].append(t)
            cpu[kind].append(c)
    rows = []
    for kind, (_, info) in zip(kinds, runs):
        rows.append({**info, "window_ms": 1e3 * statistics.median(times[kind]),
                     "window_ms_min": 1e3 * min(times[kind]), "cpu_ms": 1e3 * statistics.median(cpu[kind]),
                     "windows_ms": [1e3 * t for t in times[kind]]})
    if len(kinds) == 2:
        rows[-1]["ratio_to_torch"] = statistics.median(
            f / t for t, f in zip(times["torch-fused"], times["fastaccum"]))
        rows[-1]["cpu_ratio_to_torch"] = statistics.median(
            f / t for t, f in zip(cpu["torch-fused"], cpu["fastaccum"]))
    return rows


def worker(rank, init_file, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = []
    for setup in args.setups:
        rows += run_setup(rank, setup, args)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_distributed.py: c10d teardown at exit sometimes aborts


def parse_count(s: str) -> int:
    mult = {"K": 1e3, "M": 1e6}.get(s[-1].upper(), 1)
    return int(float(s[:-1] if s[-1].upper() in "KM" else s) * mult)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=parse_count, default=parse_count("4M"))
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--setups", nargs="+", default=["ddp-fp32", "ddp-bf16", "fsdp2"],
                    choices=["ddp-fp32", "ddp-bf16", "fsdp2"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import tempfile

    d = tempfile.mkdtemp()
    out = os.path.join(d, "rows.json")
    mp.spawn(worker, args=(os.path.join(d, "init"), args, out), nprocs=WORLD, join=True)
    rows = json.load(open(out))
    print(f"2 gloo ranks, 1 thread each, accumulation {args.accum}, micro-batch {args.micro}, "
          f"median of {args.windows} windows; the two optimizers' windows alternate")
    print(f"{'setup':10} {'optimizer':12} {'params':>9} {'window ms':>10} {'min ms':>8} {'/torch':>7} "
          f"{'CPU ms':>7} {'/torch':>7}  payload per rank per window")
    for r in rows:
        wire = ", ".join(f"{k} {v / 1e6:.2f} MB" if v >= 1e4 else f"{k} {v} B"
                         for k, v in r["payload_bytes_per_rank"].items())
        ratio = f"{r['ratio_to_torch']:.2f}" if "ratio_to_torch" in r else ""
        cratio = f"{r['cpu_ratio_to_torch']:.2f}" if "cpu_ratio_to_torch" in r else ""
        print(f"{r['setup']:10} {r['optimizer']:12} {r['params']:>9} {r['window_ms']:>10.1f} "
              f"{r['window_ms_min']:>8.1f} {ratio:>7} {r['cpu_ms']:>7.1f} {cratio:>7}  {wire}")
    print("/torch: median over the window pairs of fastaccum's time / torch's neighbouring window's. CPU ms: "
          "rank 0's process time in the window (all its threads), which waiting does not count")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
