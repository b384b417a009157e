"""Same tokens, different accumulation: does the bigger effective batch pay?

A byte-level character language model (a tiny causal transformer) is trained on the
project's own README and design notes (``examples/data/corpus.txt``, bundled: no download)
three times with the same micro-batch and the same token budget, accumulating 1, 4 and 16
micro-batches per update. Adam's β2 is rescaled for each effective batch from one reference
with :func:`fastaccum.batch_scaling.scale_betas` (Marek et al. 2025: same token half-life of
the second moment). Every run measures the gradient noise scale of McCandlish et al. 2018
with :class:`fastaccum.noise_scale.NoiseScaleEstimator`, from the per-micro-batch gradient
norms and the window's norm -- once with every micro-batch reporting, once with only the
first (what the optimizer can measure for fp32 parameters) -- and prints what
:func:`fastaccum.advice.advise` makes of it.

The loop is plain torch (``torch.optim.AdamW``): each micro-batch's gradient is computed on
its own, its squared norm taken, and the token-weighted sum kept; at the end of the window
``p.grad`` is set to the token-weighted mean and the optimizer steps. That is exactly what
``fastaccum.AdamW(..., accumulation_steps=N)`` with ``opt.backward(loss, weight=n_tokens)``
computes; measuring the norms inside the optimizer is left to its own hookup.

    python examples/batch_size_study.py            # < 3 minutes on 2 CPU cores
    python examples/batch_size_study.py --quick    # < 30 s, used by the tests
    python examples/batch_size_study.py --plot study.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastaccum.advice import assess  # noqa: E402
from fastaccum.batch_scaling import scale_betas  # noqa: E402
from fastaccum.noise_scale import NoiseScaleEstimator  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")


class TinyLM(nn.Module):
    """Byte embedding + learned positions + pre-norm causal transformer blocks."""

    def __init__(self, seq_len: int, d: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def load_text(path: str = DATA) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def lr_at(tokens: int, budget: int, lr: float, warmup: float = 0.05) -> float:
    """Linear warmup, then cosine to 10 %, both in *tokens* so that every run follows the
    same schedule whatever its number of updates."""
    frac = tokens / budget
    if frac < warmup:
        return lr * (frac + 1e-9) / warmup
    p = (frac - warmup) / (1 - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = (val.numel() - 1) // seq_len
    x = val[: n * seq_len].view(n, seq_len)
    y = val[1 : n * seq_len + 1].view(n, seq_len)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    model.train()
    return float(loss)


def run(args: argparse.Namespace, accum: int, train: torch.Tensor, val: torch.Tensor) -> Dict[str, object]:
    torch.manual_seed(args.seed)  # same initial weights for every run
    model = TinyLM(args.seq_len, args.d_model, args.layers, args.heads, args.dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    micro_tokens = args.micro_batch * args.seq_len
    eff_tokens = micro_tokens * accum
    betas = scale_betas((0.9, args.ref_beta2), args.ref_batch_tokens, eff_tokens)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=betas, weight_decay=0.1)
    est_all = NoiseScaleEstimator(ema=args.noise_ema)
    est_first = NoiseScaleEstimator(ema=args.noise_ema)
    gen = torch.Generator().manual_seed(args.seed + 1)  # same data order for every run
    n_micro = args.tokens // micro_tokens
    offsets = torch.arange(args.seq_len + 1)
    tokens = 0
    updates = 0
    grad_norm: Optional[float] = None
    curve: List[tuple] = [(0, evaluate(model, val, args.seq_len))]
    eval_every = max(1, n_micro // args.evals)
    acc_grads = [torch.zeros_like(p) for p in params]
    micro_sumsqs: List[float] = []
    micro_weights: List[float] = []
    for i in range(n_micro):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.micro_batch,), generator=gen)
        chunk = train[starts[:, None] + offsets]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))  # token mean
        loss.backward()
        w = float(y.numel())  # this micro-batch's weight: its token count
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            micro_sumsqs.append(float(sum(g.double().pow(2).sum() for g in grads)))  # |g_i|²
            micro_weights.append(w)
            torch._foreach_add_(acc_grads, grads, alpha=w)  # Σ w_i g_i
        tokens += int(w)
        if (i + 1) % accum == 0:
            W = sum(micro_weights)
            with torch.no_grad():
                for p, a in zip(params, acc_grads):
                    p.grad = a / W  # the token-weighted mean G_B
                window_sumsq = float(sum(p.grad.double().pow(2).sum() for p in params))  # |G_B|²
                grad_norm = math.sqrt(window_sumsq)
            est_all.update(micro_sumsqs, micro_weights, window_sumsq, W)
            est_first.update([micro_sumsqs[0]] + [None] * (len(micro_sumsqs) - 1), micro_weights, window_sumsq, W)
            for group in opt.param_groups:
                group["lr"] = lr_at(tokens, args.tokens, args.lr)
            opt.step()
            updates += 1
            for a in acc_grads:
                a.zero_()
            micro_sumsqs, micro_weights = [], []
        if (i + 1) % eval_every == 0 or i + 1 == n_micro:
            curve.append((tokens, evaluate(model, val, args.seq_len)))
    stats = dict(
        grad_norm=grad_norm, loss_scale=None, skipped_steps=0, effective_batch=float(eff_tokens),
        noise_scale=est_all.value, micro_batch_weight=float(micro_tokens), accumulation_steps=accum, betas=betas,
    )
    return dict(
        accum=accum, eff_tokens=eff_tokens, updates=updates, tokens=tokens, betas=betas,
        val_loss=curve[-1][1], curve=curve, noise_all=est_all.value, noise_first=est_first.value,
        advice=assess(stats),
    )


def fmt_noise(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and budget (< 30 s), for tests")
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 4, 16], help="accumulation steps to compare")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (fixed)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=None, help="token budget per run (same for all)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--ref-beta2", type=float, default=0.99, help="beta2 tuned at --ref-batch-tokens")
    ap.add_argument("--ref-batch-tokens", type=int, default=2048, help="tokens per update beta2 was tuned at")
    ap.add_argument("--noise-ema", type=float, default=0.9, help="EMA decay of the noise-scale estimator")
    ap.add_argument("--evals", type=int, default=8, help="held-out evaluations per run (for the plot)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--data", default=DATA, help="a text file (default: the bundled project text)")
    ap.add_argument("--plot", metavar="OUT.png", default=None, help="write held-out loss vs tokens (matplotlib)")
    args = ap.parse_args(argv)
    if args.quick:
        args.micro_batch, args.seq_len, args.d_model, args.layers = 4, 32, 32, 1
        args.ref_batch_tokens = 512
    if args.tokens is None:
        # 48 updates at accumulation 16 (768 micro-batches), whatever --accum lists, so that
        # runs of different invocations are comparable
        args.tokens = args.micro_batch * args.seq_len * 16 * (8 if args.quick else 48)

    data = load_text(args.data)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    # a model this small gains nothing from intra-op threads, and on a shared machine their
    # spinning makes each step many times slower: one thread by default
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run(args, a, train, val) for a in args.accum]
    elapsed = time.perf_counter() - t0

    micro_tokens = args.micro_batch * args.seq_len
    print(f"# Batch-size study: {args.tokens:,} tokens per run, micro-batch {args.micro_batch} x {args.seq_len} "
          f"= {micro_tokens} tokens; beta2 {args.ref_beta2} at {args.ref_batch_tokens} tokens/update, "
          f"rescaled with scale_betas\n")
    print("| accumulation | effective batch (tokens) | updates | beta2 | held-out loss | "
          "noise scale (tokens) | noise scale, 1st micro only | advice |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['accum']} | {r['eff_tokens']:,} | {r['updates']} | {r['betas'][1]:.6g} | {r['val_loss']:.4f} | "
              f"{fmt_noise(r['noise_all'])} | {fmt_noise(r['noise_first'])} | {r['advice'].verdict} |")
    print()
    for r in results:
        print(f"- accumulation {r['accum']}: {r['advice'].message}")
    print(f"\n({elapsed:.1f} s, {torch.get_num_threads()} threads)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", label=f"accumulation {r['accum']} (beta2 {r['betas'][1]:.4g})")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(f"Same token budget, micro-batch {micro_tokens} tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
