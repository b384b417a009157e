"""What ``track_noise_scale=True`` costs: one accumulation window (N micro-batches of
backward + step) with and without it, interleaved in one run, median ratio.

    PYTHONPATH=. python bench/noise_scale_cost.py [--backend cpu] [--params-m 4] [--accum 4] [--repeats 15]

The extra work with tracking: the copy of each window's first fp32 gradient is read once
more for its squared norm (bf16/fp16 folds get it from the accumulate kernel's side output
on the cpu backend; the torch backend reads each folded gradient again), and the norm pass
runs every step (without clipping or loss scaling it would not run). Plus a few host
numbers per micro-batch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastaccum


def window_time(opt, model, x, accum: int) -> float:
    t0 = time.perf_counter()
    for _ in range(accum):
        opt.backward(model(x).float().pow(2).mean(), weight=x.shape[0])
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--params-m", type=float, default=4.0, help="millions of parameters")
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = 1024
    layers = max(1, round(args.params_m * 1e6 / (d * d)))
    print(f"backend {args.backend}, {layers * d * d / 1e6:.1f}M params, accumulation {args.accum}, "
          f"micro-batch {args.batch}, {args.threads} thread(s)")
    print("| dtype | window, off (ms) | window, on (ms) | on/off |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        runs = {}
        for track in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to(dtype)
            opt = fastaccum.AdamW(model.parameters(), lr=1e-5, accumulation_steps=args.accum,
                                  backend=args.backend, track_noise_scale=track)
            runs[track] = (opt, model)
        x = torch.randn(args.batch, d, dtype=dtype)
        times = {False: [], True: []}
        for r in range(args.repeats + 2):  # interleaved: both see the same machine load
            for track in (False, True):
                t = window_time(*runs[track], x, args.accum)
                if r >= 2:
                    times[track].append(t)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {str(dtype).replace('torch.', '')} | {off * 1e3:.1f} | {on * 1e3:.1f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
