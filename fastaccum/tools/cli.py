"""``fastaccum`` command line.

``fastaccum bench``  fastaccum (every available backend) vs torch.optim.AdamW (for-loop, foreach,
                     fused) and DeepSpeed's CPU Adam, side by side in one process, with the
                     machine's streaming bandwidth measured in the same run.
``fastaccum plan``   memory breakdown per optimizer mode, the largest micro-batch that fits, the
                     accumulation steps for a target batch, and Adam's β2 for the batch used.

Bad input prints one line ``fastaccum <command>: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line instead of argparse's usage block: the message is what the user needs
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------- helpers
def _positive_int(name: str) -> Any:
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
        return v

    return conv


def _count(name: str) -> Any:
    from .units import parse_count

    def conv(text: str) -> int:
        try:
            return parse_count(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return conv


def _count_list(text: str) -> List[int]:
    from .units import parse_count

    out = []
    for part in text.split(","):
        try:
            out.append(parse_count(part))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


def _choice_list(name: str, choices: Sequence[str], aliases: Optional[Dict[str, List[str]]] = None) -> Any:
    aliases = aliases or {}

    def conv(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        items = list(dict.fromkeys(x for t in items for x in aliases.get(t, [t])))
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join([*choices, *aliases])} (comma-separated)")
        return items

    return conv


def _probability(name: str, lo_open: bool = True) -> Any:
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < 0 or v >= 1 or (lo_open and v == 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be in {'(0' if lo_open else '[0'}, 1)")
        return v

    return conv


def _device(text: str) -> Any:
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise CliError(f"--device {text!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {text}: CUDA is not available in this torch build/machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CliError("--device mps: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CliError(f"--device {text}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
    return dev


def _console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    # a fixed width when not on a terminal (pipes, CI logs): rich would otherwise squeeze to 80
    return Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))


# --------------------------------------------------------------------------- bench
QUICK_PARAMS = [1_000_000, 4_000_000]
DEFAULT_PARAMS = [1_000_000, 10_000_000, 100_000_000]


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="time fastaccum vs torch.optim.AdamW (and DeepSpeed CPU Adam) side by side",
        description="Time one optimizer step and one full accumulation cycle (N micro-batches + loss scale + "
                    "clip + step) of fastaccum (every available backend) vs torch.optim.AdamW for-loop/foreach/fused "
                    "and DeepSpeed's CPU Adam when importable, with the streaming bandwidth measured in the same run. "
                    "GB/s counts the bytes/param of each row's algorithm (see fastaccum/tools/bench.py).",
    )
    p.add_argument("--params", type=_count_list, default=None,
                   help="comma-separated parameter counts (default 1M,10M,100M: about 9 minutes and 6.6 GB of RAM "
                        "on a 2-core machine; --quick: 1M,4M, under a minute and < 1 GB)")
    p.add_argument("--accum", type=_positive_int("--accum"), default=4, help="micro-batches per cycle (default 4)")
    p.add_argument("--dtype", type=_choice_list("--dtype", ["fp32", "bf16", "fp16"]), default=["fp32", "bf16"],
                   help="parameter dtypes, comma-separated (default fp32,bf16)")
    p.add_argument("--mode", type=_choice_list("--mode", ["step", "cycle"], {"both": ["step", "cycle"]}),
                   default=["step", "cycle"],
                   help="step (one update), cycle (accumulation window), or both (default; also step,cycle)")
    p.add_argument("--impl", type=lambda s: [t.strip() for t in s.split(",") if t.strip()], default=None,
                   help="only rows whose name starts with one of these, e.g. fastaccum,torch-fused")
    p.add_argument("--threads", type=_positive_int("--threads"), default=0,
                   help="torch intra-op threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=None,
                   help="timed rounds per row (default 7; --quick 5); a row whose spread (interquartile range / "
                        "median) stays above 10%% gets up to 3x as many, and is marked noisy if it still does")
    p.add_argument("--warmup", type=_positive_int("--warmup"), default=None, help="untimed runs per row (default 2)")
    p.add_argument("--quick", action="store_true", help="small sizes (1M,4M) and fewer repeats: under a minute on 2 cores")
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON (schema fastaccum.bench/1); "
                   "with the default sizes the run takes about 9 minutes and 6.6 GB (add --quick for a minute)")
    p.add_argument("--all", action="store_true", help="also list the skipped rows in the full table")
    p.add_argument("--plot", metavar="PATH.png", help="write GB/s vs parameters per implementation (matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastaccum bench", unit="row", file=sys.stderr, leave=False,
                dynamic_ncols=True)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench as B

    device = _device(args.device)
    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise CliError(f"{what} {path}: directory {d} does not exist; create it or pick another path")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'fastaccum[cli]'") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = B.BenchConfig(
        params=args.params or (QUICK_PARAMS if args.quick else DEFAULT_PARAMS),
        accum=args.accum, dtypes=args.dtype, modes=args.mode, device=str(device), threads=args.threads,
        repeats=args.repeats or (5 if args.quick else 7), warmup=args.warmup or (1 if args.quick else 2),
        impls=args.impl, quick=args.quick,
        # --quick is README's CI job: on a busy machine, stop adding rounds (rows are then marked noisy)
        extend_budget_s=60.0 if args.quick else None,
    )
    impls = B.implementations(device)
    if cfg.impls:
        impls = [(n, w) for n, w in impls if any(n.startswith(f) for f in cfg.impls)]
        if not impls:
            names = ", ".join(n for n, _ in B.implementations(device))
            raise CliError(f"--impl {','.join(cfg.impls)} matches no implementation; choose from {names}")
    total = len(cfg.params) * len(cfg.dtypes) * len(cfg.modes) * len(impls)
    bar = _progress_bar(total, not args.no_progress)

    def progress(k: int, label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(k)

    try:
        result = B.run_suite(cfg, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print_bench(result, show_skipped=args.all)
    if args.json:
        B.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        B.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _ratio_cell(ratio: float, spread: Optional[List[float]], noisy: bool) -> str:
    cell = f"{ratio:.2f}x"
    if spread:
        cell += f" [{spread[0]:.2f}-{spread[1]:.2f}]"
    return cell + (" ~" if noisy else "")


def bench_table_rows(result: Dict[str, Any], show_skipped: bool = False) -> List[List[str]]:
    out = []
    for r in result["rows"]:
        mode = r["mode"] + (f" x{r['accum']}" if r["mode"] == "cycle" else "")
        if r["status"] != "ok":  # the reason is printed once under the table
            if show_skipped:
                out.append([r["impl"], mode, r["dtype"], _fmt_count(r["params"]), str(r["bytes_per_param"] or "-"),
                            r["status"], "", "", "", "", "", ""])
            continue
        pct = _fmt(r["pct_bandwidth"], ".0f", "%")
        if r["pct_bandwidth"] is not None and (r.get("in_cache") or r["pct_bandwidth"] > 100):
            pct += "*"
        vs = _fmt(r["speedup_vs_torch_fused"], ".2f", "x")
        if r["family"] == "fastaccum" and r["dtype"] != "fp32" and r["speedup_vs_torch_fused"] is not None:
            vs += " !"  # against torch's bf16 state: not like for like
        out.append([
            r["impl"], mode, r["dtype"], _fmt_count(r["params"]), str(r["bytes_per_param"]),
            f"{r['median_ms']:.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}]" + (" ~" if r.get("noisy") else ""),
            _fmt(r["params_per_s"] and r["params_per_s"] / 1e6, ".0f"),
            _fmt(r["gbps"], ".1f"), pct, vs, _fmt(r["speedup_vs_torch_foreach"], ".2f", "x"),
            _fmt(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".0f"),
        ])
    return out


BENCH_HEADERS = ["impl", "mode", "dtype", "params", "B/param", "ms median [min-max]", "Mparam/s", "GB/s",
                 "% stream", "vs fused", "vs foreach", "peak MiB"]


def _fmt_count(n: int) -> str:
    from .units import format_count

    return format_count(n)


def verdict_table(result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Title, headers and rows of the verdict (None when no fastaccum row could be compared)."""
    v = result.get("verdict") or {}
    if not v.get("lines"):
        return None
    m = result["machine"]
    sizes = sorted({c["params"] for ln in v["lines"] for c in ln["cells"]})
    summary = ", ".join(
        f"{ln['what'].replace(' params', '')} "
        + (f"{ln['min_ratio']:.2f}x" if f"{ln['min_ratio']:.2f}" == f"{ln['max_ratio']:.2f}"
           else f"{ln['min_ratio']:.2f}-{ln['max_ratio']:.2f}x") + (" ~" if ln["noisy"] else "")
        for ln in v["lines"])
    title = (f"{v['impl']} vs torch fused AdamW on this machine ({m['device_name']}, {m['torch_threads']} threads): "
             f"{summary}")
    headers = ["what", *(_fmt_count(n) for n in sizes), "compared with"]
    rows = []
    for ln in v["lines"]:
        cells = {c["params"]: _ratio_cell(c["ratio"], c["spread"], c["noisy"]) for c in ln["cells"]}
        rows.append([ln["what"], *(cells.get(n, "-") for n in sizes), ln["vs"]])
    noisy = [ln["what"] for ln in v["lines"] if ln["noisy"]]
    foot = v["definition"] + "."
    if noisy:
        foot += (f" Noisy here: {'; '.join(noisy)} - the machine was busy during those rows; rerun, or read "
                 "the quartiles rather than the median.")
    return {"title": title, "headers": headers, "rows": rows, "foot": foot}


def _print_plain(title: str, headers: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def print_bench(result: Dict[str, Any], show_skipped: bool = False) -> None:
    bw, m, v = result["bandwidth"], result["machine"], result["versions"]
    llc = bw.get("llc_bytes")
    head = (f"all rows: fastaccum {v['fastaccum']} | torch {v['torch']} | {m['device_name']} | {m['torch_threads']} "
            f"threads | stream update {bw['update_gbps']:.1f} GB/s (copy {bw['copy_gbps']:.1f}, "
            f"triad {bw['triad_gbps']:.1f})")
    foot_lines = [
        "vs fused/foreach = time of torch AdamW fused/foreach / time of the row (>1: faster), same dtype. GB/s = "
        "bytes/param (the row's own minimum traffic, see --json bytes_note) x params / median time.",
        "% stream = GB/s / the stream update figure, measured on arrays >= 4x the last-level cache (a DRAM "
        "figure). * = the row's working set (params, grads, state) fits in about twice the "
        + (f"{llc / 2**20:.0f} MiB " if llc else "") + "cache, or the row passes 100%: part of its traffic is "
        "served from cache, so the % is not a bound there.",
        "! = fastaccum with bf16/fp16 params keeps fp32 master weights and moments (30 B/param per step); torch's "
        "row with the same dtype keeps everything 16-bit (14 B/param, updates below half an ulp are lost): not "
        "like for like. The verdict above compares with torch on fp32 params instead.",
        "~ = noisy: interquartile range above 10% of the median after 3x the rounds.",
    ]
    reasons = dict.fromkeys(f"{r['impl']}: {r['status']}: {r['reason']}" for r in result["rows"] if r["status"] != "ok")
    foot = "\n".join([*foot_lines, *reasons])
    rows = bench_table_rows(result, show_skipped)
    verdict = verdict_table(result)
    console = _console()
    if console is not None:
        from rich.table import Table

        if verdict is not None:
            t = Table(title=verdict["title"], title_justify="left")
            for h in verdict["headers"]:
                t.add_column(h, justify="left" if h in ("what", "compared with") else "right", no_wrap=h != "compared with")
            for r in verdict["rows"]:
                t.add_row(*r)
            console.print(t)
            console.print(verdict["foot"], style="dim", markup=False, highlight=False)
            console.print()
        table = Table(title=head, title_justify="left", show_lines=False)
        for h in BENCH_HEADERS:
            table.add_column(h, justify="left" if h in ("impl", "mode", "dtype") else "right", no_wrap=True)
        prev = None
        ok_rows = [raw for raw in result["rows"] if show_skipped or raw["status"] == "ok"]
        for r, raw in zip(rows, ok_rows):
            key = (raw["params"], raw["dtype"], raw["mode"])
            if prev is not None and key != prev:
                table.add_section()
            prev = key
            style = "bold" if raw["impl"].startswith("fastaccum") else ("dim" if raw["status"] != "ok" else None)
            table.add_row(*r, style=style)
        console.print(table)
        console.print(foot, style="dim", markup=False, highlight=False)
        return
    if verdict is not None:
        _print_plain(verdict["title"], verdict["headers"], verdict["rows"])
        print(verdict["foot"])
        print()
    _print_plain(head, BENCH_HEADERS, rows)
    print(foot)


# ---------------------------------------------------------------------------- plan
def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="memory breakdown, largest micro-batch, accumulation steps and beta2 for a memory budget",
        description="Plan micro-batch and accumulation for a memory budget. The model is a parameter count plus "
                    "shape numbers (--layers --hidden --seq-len [--vocab --heads]) or --model module:factory. "
                    "Activation memory is estimated with Korthikanti et al. 2022 eq. (2) unless --measure runs "
                    "the model. beta2 follows the half-life rule of Marek et al. 2025.",
    )
    p.add_argument("--params", type=_count("--params"), help="parameter count, e.g. 124M (default: from the shape)")
    p.add_argument("--layers", type=_positive_int("--layers"), help="transformer layers")
    p.add_argument("--hidden", type=_positive_int("--hidden"), help="hidden size")
    p.add_argument("--seq-len", type=_positive_int("--seq-len"), help="tokens per sequence")
    p.add_argument("--vocab", type=_positive_int("--vocab"), help="vocabulary size (logits memory)")
    p.add_argument("--heads", type=_positive_int("--heads"), help="attention heads (needed for --attention eager)")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="import path of a function returning an nn.Module")
    p.add_argument("--input", metavar="MODULE:FN", help="--measure: fn(batch_size) returning the model's input "
                   "(default: the module's example_input(batch_size) method)")
    p.add_argument("--memory", help="memory budget, e.g. 6GB or 8GiB (default: free memory of --device)")
    p.add_argument("--headroom", type=_probability("--headroom", lo_open=False), default=0.10,
                   help="fraction of the budget kept free for fragmentation and workspaces (default 0.1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch", type=_positive_int("--batch"), help="target effective batch in sequences (all devices)")
    g.add_argument("--tokens", type=_count("--tokens"), help="target effective batch in tokens, e.g. 0.5M")
    p.add_argument("--devices", type=_positive_int("--devices"), default=1, help="data-parallel devices (default 1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="parameter dtype of the recommended fastaccum mode (default bf16)")
    p.add_argument("--attention", choices=["flash", "eager"], default="flash",
                   help="flash (fused SDPA, default) does not store attention scores; eager does")
    p.add_argument("--beta2", type=_probability("--beta2"), default=0.999, help="Adam beta2 as tuned (default 0.999)")
    p.add_argument("--beta2-batch", type=_positive_int("--beta2-batch"),
                   help="batch (sequences) --beta2 was tuned at (default: the target batch)")
    p.add_argument("--measure", action="store_true", help="run forward/backward with growing micro-batches on "
                   "--device to measure activation memory (needs --model)")
    p.add_argument("--device", default="cpu", help="device for --measure and the default --memory (default cpu)")
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON (schema fastaccum.plan/1)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from . import plan as P

    device = _device(args.device) if (args.measure or not args.memory) else None
    opts = P.PlanOptions(**{k: getattr(args, k) for k in P.PlanOptions.__dataclass_fields__ if k != "device"},
                         device=device)
    result = P.make_plan(opts)
    print_plan(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    # 1: valid input, but no mode fits the budget (scripts can tell "no plan" from bad input)
    return 0 if any(r["fits"] for r in result["modes"]) else 1


def print_plan(res: Dict[str, Any]) -> None:
    from .units import fmt_bytes

    m, mem, tgt, act, rec = res["model"], res["memory"], res["target"], res["activations"], res["recommendation"]
    shape = " ".join(f"{k}={m[k]}" for k in ("layers", "hidden", "seq_len", "vocab", "heads") if m[k])
    lines = [f"model: {m['params']:,} parameters ({m['source']}){'; ' + shape if shape else ''}"]
    inferred = m.get("inferred") or {}
    for why in dict.fromkeys(inferred.values()):  # one line per source, listing the fields it gave
        keys = [k.replace("_", "-") for k, v in inferred.items() if v == why]
        lines.append(f"  {', '.join(keys)} from {why} (give --{' --'.join(keys)} to override)")
    lines.append(f"memory: {fmt_bytes(mem['budget_bytes'])} ({mem['source']}), {fmt_bytes(mem['usable_bytes'])} usable "
                 f"after {mem['headroom']:.0%} headroom")
    fixed = f" + {fmt_bytes(act['fixed_bytes'])} fixed" if act["fixed_bytes"] else ""
    if act["measured"]:
        # one measurement, used for every mode: a single figure, labelled with what was measured
        lines.append(f"activations per sequence: {fmt_bytes(act['bytes_per_sequence_16bit'])}{fixed} measured with "
                     f"{act['measured'].get('dtype', '?')} parameters on {act['measured'].get('device', '?')} "
                     f"[{act['source']}]")
    else:
        lines.append(f"activations per sequence: {fmt_bytes(act['bytes_per_sequence_16bit'])} 16-bit, "
                     f"{fmt_bytes(act['bytes_per_sequence_32bit'])} fp32{fixed} [{act['source']}]")
    if tgt["batch_sequences"]:
        lines.append(f"target: {tgt['batch_sequences']} sequences per optimizer step"
                     + (f" ({tgt['tokens']:,} tokens)" if tgt["tokens"] else "")
                     + f" on {tgt['devices']} device(s) = {tgt['per_device_sequences']} per device")
    headers = ["mode", "params", "grads", "master", "state", "in-flight", "static", "max micro",
               "micro x accum", "batch", "note"]
    rows = []
    for r in res["modes"]:
        split = f"{r['micro_batch']} x {r['accumulation_steps']}" if r["fits"] else "-"
        rows.append([r["short"], fmt_bytes(r["params_bytes"]), fmt_bytes(r["grads_bytes"]),
                     fmt_bytes(r["master_bytes"]) if r["master_bytes"] else "-", fmt_bytes(r["state_bytes"]),
                     fmt_bytes(r["transient_bytes"]) if r["transient_bytes"] else "-", fmt_bytes(r["static_bytes"]), str(r["max_micro_batch"]), split,
                     str(r["effective_batch"] or "-"), r["note"] or ""])
    tail = []
    if "beta2" in rec:
        b = rec["beta2"]
        tail.append(f"recommended ({rec['mode']}): micro-batch {rec['micro_batch']} x {rec['accumulation_steps']} "
                    f"accumulation step(s) = effective batch {rec['effective_batch']}")
        hl = f", exp_avg_sq half-life {b['half_life_tokens']:,.0f} tokens" if b["half_life_tokens"] else ""
        use = f"use {b['for_chosen_batch']:.6g} at batch {b['chosen_batch']}"
        if b["without_accumulation_batch"] != b["chosen_batch"]:
            use += (f"; {b['without_accumulation']:.6g} at batch {b['without_accumulation_batch']} "
                    "without accumulation")
        tail.append(f"beta2 {b['given']} tuned at batch {b['tuned_at_batch']} ({b['tuned_at_batch_source']}){hl}: "
                    f"{use} [{b['rule']}]")
    tail += [f"note: {n}" for n in rec["notes"]]
    console = _console()
    if console is not None:
        from rich.table import Table

        for line in lines:
            console.print(line, highlight=False, markup=False)
        table = Table(show_lines=False, caption="SR: stochastic rounding (master_weights=False). "
                      "grads: torch's .grad or fastaccum's fp32 buffer; in-flight: the largest gradient autograd "
                      "hands to fastaccum's hook, alive until the hook folds it into the buffer (or, in step-in-backward, "
                      "applies it); static = params + grads + master + state + in-flight; does not fit: static + one "
                      "sequence > usable memory",
                      caption_justify="left")
        for h in headers:
            table.add_column(h, justify="left" if h in ("mode", "note") else "right", overflow="fold",
                             no_wrap=h == "mode")
        for r, raw in zip(rows, res["modes"]):
            table.add_row(*r, style="bold" if raw["mode"] == res["chosen_mode"] else None)
        console.print(table)
        for line in tail:
            console.print(line, highlight=False, markup=False)
        return
    print("\n".join(lines))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\n".join(tail))


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastaccum", description="fastaccum: exact, fused gradient accumulation for PyTorch.")
    import fastaccum

    parser.add_argument("--version", action="version", version=f"fastaccum {fastaccum.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,plan}", parser_class=_Parser)
    _add_bench(sub)
    _add_plan(sub)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> set:
    """Option strings that take a value, over the parser and its sub-commands."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            out.update(s for s in action.option_strings if s.startswith("--"))
    return out


def _join_negative_values(argv: Sequence[str], value_options: set) -> List[str]:
    """``--memory -6GB`` -> ``--memory=-6GB``: argparse takes ``-6GB`` for an option and answers
    "expected one argument"; joined, the value reaches its parser and gets the same message
    as ``--memory=-6GB`` ("must be > 0")."""
    out: List[str] = []
    it = iter(range(len(argv)))
    for i in it:
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in value_options and nxt is not None and len(nxt) > 1 and nxt[0] == "-" and (
                nxt[1].isdigit() or nxt[1] == "."):
            out.append(f"{tok}={nxt}")
            next(it, None)
        else:
            out.append(tok)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .plan import PlanError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_values(argv, _value_options(parser)))
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    prog = f"fastaccum {args.command}"
    try:
        return int(args.func(args) or 0)
    except (CliError, PlanError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
