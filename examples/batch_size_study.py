"""Same tokens, different accumulation: does the bigger effective batch pay?

A byte-level character language model (a tiny causal transformer) is trained on the
project's own README and design notes (``examples/data/corpus.txt``, bundled: no download)
three times with the same micro-batch and the same token budget, accumulating 1, 4 and 16
micro-batches per update, with ``fastaccum.AdamW(accumulation_steps=N)`` and
``opt.backward(loss, weight=n_tokens)``. Adam's β2 keeps one token half-life for every
effective batch (``beta2_halflife_tokens=``, Marek et al. 2025). The optimizer measures the
gradient noise scale of McCandlish et al. 2018 from its own accumulation
(``track_noise_scale=True``: fp32 parameters, so the first micro-batch of each window
reports its norm), and :func:`fastaccum.advise` reads ``opt.stats()``. The noise scale grows
as the loss falls, so each estimate is printed with the training loss it was measured at, and
the runs' estimates are also compared at matched training loss.

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

import fastaccum  # noqa: E402
from fastaccum import assess, halflife_tokens  # noqa: E402

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
    # beta2 tuned at ref_batch_tokens, kept at the same token half-life for every batch: the
    # optimizer picks beta2 per update from the tokens of its window (Marek et al. 2025)
    halflife = halflife_tokens(args.ref_beta2, args.ref_batch_tokens)
    opt = fastaccum.AdamW(params, lr=args.lr, weight_decay=0.1, accumulation_steps=accum,
                          beta2_halflife_tokens=halflife, track_noise_scale=True)
    opt.noise_scale_estimator.ema = args.noise_ema
    gen = torch.Generator().manual_seed(args.seed + 1)  # same data order for every run
    n_micro = args.tokens // micro_tokens
    offsets = torch.arange(args.seq_len + 1)
    tokens = 0
    updates = 0
    curve: List[tuple] = [(0, evaluate(model, val, args.seq_len))]
    # The noise scale grows as the loss falls (McCandlish et al. 2018), so an estimate means
    # little without the loss it was measured at: the training loss of each window, averaged
    # with the estimator's own EMA weights (bias-corrected alike), is that loss.
    decay = opt.noise_scale_estimator.ema
    window_loss = window_tokens = loss_ema = 0.0
    windows = 0
    trace: List[tuple] = []  # (tokens, training loss at the estimate, noise scale) after each update
    eval_every = max(1, n_micro // args.evals)
    for i in range(n_micro):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.micro_batch,), generator=gen)
        chunk = train[starts[:, None] + offsets]
        x, y = chunk[:, :-1], chunk[:, 1:]
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))  # token mean
        opt.backward(loss, weight=y.numel())  # token-weighted; the optimizer measures |g_i|² itself
        tokens += y.numel()
        window_loss += float(loss.detach()) * y.numel()
        window_tokens += y.numel()
        updating = opt.sync_gradients  # this step() updates
        if updating:
            for group in opt.param_groups:
                group["lr"] = lr_at(tokens, args.tokens, args.lr)
            updates += 1
        opt.step()
        opt.zero_grad()
        if updating:
            windows += 1
            loss_ema = decay * loss_ema + (1 - decay) * window_loss / window_tokens
            window_loss = window_tokens = 0.0
            trace.append((tokens, loss_ema / (1 - decay**windows), opt.stats()["noise_scale"]))
        if (i + 1) % eval_every == 0 or i + 1 == n_micro:
            curve.append((tokens, evaluate(model, val, args.seq_len)))
    stats = opt.stats()  # grad_norm, effective_batch, noise_scale, betas, ...
    return dict(
        accum=accum, eff_tokens=eff_tokens, updates=updates, tokens=tokens, betas=stats["betas"],
        val_loss=curve[-1][1], curve=curve, noise=stats["noise_scale"], advice=assess(opt),
        noise_loss=trace[-1][1], trace=trace,
    )


def noise_at_loss(r: Dict[str, object], loss: float) -> Optional[tuple]:
    """(tokens, noise scale) of run ``r`` at its first update whose training loss (the same
    average as the estimate's) was at or below ``loss``; None when it never got there."""
    for tokens, at, noise in r["trace"]:  # type: ignore[union-attr]
        if noise is not None and at <= loss:
            return tokens, noise
    return None


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
    ap.add_argument("--noise-ema", type=float, default=0.9, help="EMA decay of the optimizer's noise-scale estimator")
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
          f"same token half-life (beta2_halflife_tokens)\n")
    print("| accumulation | effective batch (tokens) | updates | beta2 | held-out loss | "
          "noise scale (tokens) | at training loss | advice |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        at = "n/a" if r["noise"] is None else f"{r['noise_loss']:.4f}"
        print(f"| {r['accum']} | {r['eff_tokens']:,} | {r['updates']} | {r['betas'][1]:.6g} | {r['val_loss']:.4f} | "
              f"{fmt_noise(r['noise'])} | {at} | {r['advice'].verdict} |")
    print()
    for r in results:
        print(f"- accumulation {r['accum']}: {r['advice'].message}")
    # the estimates compared at the same training loss: where a run with a higher final loss
    # ended, what did a run that got lower measure when it passed that loss?
    measured = [r for r in results if r["noise"] is not None]
    matched = []
    for r in measured:
        for q in measured:
            hit = noise_at_loss(q, r["noise_loss"]) if q is not r and q["noise_loss"] < r["noise_loss"] else None
            if hit is not None:
                matched.append(f"- at training loss {r['noise_loss']:.4f}, where accumulation {r['accum']} ended "
                               f"measuring {fmt_noise(r['noise'])}, accumulation {q['accum']} measured "
                               f"{fmt_noise(hit[1])} (after {hit[0]:,} tokens; it ended at {fmt_noise(q['noise'])}, "
                               f"training loss {q['noise_loss']:.4f})")
    if matched:
        print("\nThe noise scale grows as the loss falls; at matched training loss:\n")
        print("\n".join(matched))
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
