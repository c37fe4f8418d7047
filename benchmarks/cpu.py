"""CPU benchmark: our BN (backend="torch") against torch.nn.BatchNorm*d, eager and compiled.

    python benchmarks/cpu.py [--threads 1 2] [--min-run-time SECONDS] [--rounds R]
                             [--shapes TEXT] [--no-variants]

For every shape and thread count, three implementations are timed in one process:
ours (``batchnorm.convert`` of torch.nn's module), torch eager (``torch.nn.BatchNorm*d``) and
Inductor (``torch.compile`` of torch.nn's module, Dynamo reset per shape and thread count, the
generated code built for that thread count). Two tables, float32:

* training: forward + backward (input and parameter gradients, running statistics updated);
* eval (inference): forward under ``torch.no_grad()``.

A third table (skipped with ``--no-variants``) times the BN family's training forward + backward
against our plain BN on the same shapes and thread counts, in its own set of alternating
rounds: Batch Renormalization (r_max = 3, d_max = 5 fixed, so r and d clip), Ghost BN with 4
virtual batches (``ghost_batch_size = N // 4``), frozen BN (in training mode: the fixed affine
map, gradient to the input only) and in-place ABN (leaky ReLU, slope 0.01), the last also
against the block it replaces, BN + leaky ReLU (our fused ``activation="leaky_relu"``). Target:
within 1.2x of our plain BN. Reported: medians over rounds, the median [min, max] of the
per-round ratio, and the ratio of the fastest rounds (other jobs only ever add time).

Shared machines drift, so the implementations are timed in alternation for ``--rounds``
rounds; a table reports each one's median over rounds, and the median of the per-round ratios
ours / peer with the smallest and largest per-round ratio beside it. With one thread the clock
is the calling thread's CPU time (all three implementations run there; a process waiting for a
core on a shared machine does not count), with more it is wall time.

The hardware limit is the rate of ``dst.copy_(x)`` for a tensor of the same shape, timed in the
same rounds (so the same caches are in play; eval and training are timed in separate sets of
rounds, each with its copy). A training step must move at least five tensors
of that size (read x, write y; read x and dy, write dx), a copy moves two, so ``2.5 * copy time
/ our time`` is the fraction of that limit we reach, overheads included. Inference moves two,
like the copy: ``copy time / our time``; the eval table adds ``x.clone()``, a copy that
allocates its output as an eval forward does (glibc's malloc then returns blocks of tens of MB
to the kernel and page-faults them back, or rotates among several free ones, at times that
depend on the allocation history of all three implementations).

Results go to benchmarks/results/cpu-<processor>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.utils.benchmark as bench
from torch import nn

import batchnorm
import batchnorm.variants as variants

# (label, shape, channels_last)
SHAPES = [
    ("MNIST MLP layer", (60, 100), False),
    ("wide FC", (256, 1024), False),
    ("BN1d sequence", (32, 64, 128), False),
    ("conv early", (32, 64, 28, 28), False),
    ("conv early, channels_last", (32, 64, 28, 28), True),
    ("conv late", (32, 256, 7, 7), False),
    ("conv 3d", (4, 32, 8, 16, 16), False),
    ("conv large", (16, 128, 56, 56), False),
    ("conv large, channels_last", (16, 128, 56, 56), True),
]
IMPLS = ("eager", "inductor", "ours")
#: (variant, baseline) pairs of the BN-family table
COMPARISONS = [("renorm", "BN"), ("ghost", "BN"), ("frozen", "BN"), ("inplace_abn", "BN"),
               ("inplace_abn", "BN+leaky")]
RESULTS = Path(__file__).parent / "results"
MIN_TENSORS_MOVED = 5  # training: forward reads x, writes y; backward reads x and dy, writes dx
LARGE_BYTES = 4 * 2**20  # the copy-rate target applies from this tensor size on


def processor_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """Processor, logical CPUs, vector extension torch uses, caches (from sysfs when there)."""
    parts = [processor_name(), f"{os.cpu_count()} logical CPUs",
             f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    if caches:
        parts.append("caches per core/shared: " + ", ".join(caches))
    return "; ".join(parts)


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def torch_class(shape):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]


def family(shape) -> dict[str, nn.Module]:
    """Our plain BN, BN + leaky ReLU and the BN family's variants, for an input of ``shape``."""
    c, n = shape[1], shape[0]
    rank = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]

    def cls(prefix: str, where=variants):
        return getattr(where, f"{prefix}{rank}d")

    return {
        "BN": cls("BatchNorm", batchnorm)(c),
        "BN+leaky": cls("BatchNorm", batchnorm)(c, activation="leaky_relu"),
        "renorm": cls("BatchRenorm")(c, r_max=3.0, d_max=5.0),
        "ghost": cls("GhostBatchNorm")(c, ghost_batch_size=max(1, n // 4)),
        "frozen": variants.FrozenBatchNorm.from_batchnorm(cls("BatchNorm", batchnorm)(c)),
        "inplace_abn": cls("InPlaceABN")(c),
    }


def timer(fn, min_run_time: float) -> float:
    """Median seconds of one call of ``fn``: with one thread, the CPU time of the calling thread
    (all three run there; on a shared machine this leaves out the time the thread waits,
    descheduled, for a core), with more, wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t = bench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                    timer=clock)
    return t.blocked_autorange(min_run_time=min_run_time).median


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One training forward+backward (input and parameter gradients)."""

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    return step


def eval_step(module: nn.Module, x: torch.Tensor):
    def step():
        with torch.no_grad():
            module(x)

    return step


def summarize(times: dict[str, list[float]], copy: list[float], nbytes: int, transfers: int):
    """Medians, per-round ratios ours / peer, fraction of the copy-rate limit."""
    ours = times["ours"]
    row = {f"{name}_ms": statistics.median(ts) * 1e3 for name, ts in times.items()}
    for peer in ("eager", "inductor"):
        ratios = sorted(o / p for o, p in zip(ours, times[peer], strict=True))
        row[f"ours_over_{peer}"] = statistics.median(ratios)
        row[f"ours_over_{peer}_range"] = [ratios[0], ratios[-1]]
    copy_s, ours_s = statistics.median(copy), statistics.median(ours)
    row["copy_ms"] = copy_s * 1e3
    row["ours_gbps"] = transfers * nbytes / ours_s / 1e9
    row["fraction_of_copy"] = transfers / 2 * copy_s / ours_s
    return row


def compare(times: dict[str, list[float]], name: str, base: str) -> dict:
    """A BN-family row: medians, per-round ratios name / base, ratio of the fastest rounds."""
    ratios = sorted(t / b for t, b in zip(times[name], times[base], strict=True))
    return dict(variant=name, baseline=base, baseline_ms=statistics.median(times[base]) * 1e3,
                variant_ms=statistics.median(times[name]) * 1e3,
                ratio=statistics.median(ratios), ratio_range=[ratios[0], ratios[-1]],
                ratio_of_best=min(times[name]) / min(times[base]))


def alternate(fns, rounds: int, min_run_time: float) -> dict[str, list[float]]:
    """Rounds of every function, one after the other: per function, its time in each round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn, min_run_time))
    return times


def measure_family(label, shape, channels_last, threads, rounds, min_run_time) -> list[dict]:
    """The BN-family rows of one shape and thread count (training forward + backward)."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    fns = {name: train_step(m.train(), x, dy) for name, m in family(shape).items()}
    for fn in fns.values():  # warm up (and build the variants' CPU kernels once)
        for _ in range(3):
            fn()
    times = alternate(fns, rounds, min_run_time)
    return [dict(shape=f"{label} {tuple(shape)}", threads=threads, **compare(times, name, base))
            for name, base in COMPARISONS]


def measure(label, shape, channels_last, threads, rounds, min_run_time):
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch._inductor.config.cpp.threads = threads  # generated code's OpenMP team size
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    cls = torch_class(shape)
    train = {"eager": cls(shape[1]), "ours": batchnorm.convert(cls(shape[1]))}
    train["inductor"] = torch.compile(cls(shape[1]))
    infer = {"eager": cls(shape[1]).eval(), "ours": batchnorm.convert(cls(shape[1])).eval()}
    infer["inductor"] = torch.compile(cls(shape[1]).eval())
    for module in (*train.values(), *infer.values()):  # non-trivial running statistics
        with torch.no_grad():
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    train_fns = {name: train_step(m, xg, dy) for name, m in train.items()}
    infer_fns = {name: eval_step(m, x) for name, m in infer.items()}
    for fn in (*train_fns.values(), *infer_fns.values()):  # compile, warm up
        for _ in range(3):
            fn()
    dst = torch.empty_like(x)
    # eval first, then training, each with its own copy timings: measured apart, the eval
    # rounds do not inherit the cache and heap state of training steps (four tensors) in between
    infer_t = alternate({**infer_fns, "copy": lambda: dst.copy_(x), "clone": x.clone}, rounds,
                        min_run_time)
    train_t = alternate({**train_fns, "copy": lambda: dst.copy_(x)}, rounds, min_run_time)
    name = f"{label} {tuple(shape)}"
    infer_row = summarize({k: infer_t[k] for k in IMPLS}, infer_t["copy"], x.nbytes, 2)
    infer_row["clone_ms"] = statistics.median(infer_t["clone"]) * 1e3
    infer_row["fraction_of_clone"] = infer_row["clone_ms"] / infer_row["ours_ms"]
    return (dict(shape=name, mbytes=x.nbytes / 2**20, threads=threads,
                 **summarize({k: train_t[k] for k in IMPLS}, train_t["copy"], x.nbytes,
                             MIN_TENSORS_MOVED)),
            dict(shape=name, mbytes=x.nbytes / 2**20, threads=threads, **infer_row))


def table(rows, title: str, limit_note: str) -> str:
    clone = bool(rows) and "clone_ms" in rows[0]
    lines = [f"### {title}\n", limit_note + "\n",
             "| shape | MB | threads | eager (ms) | Inductor (ms) | ours (ms) | ours / eager "
             "[min, max] | ours / Inductor [min, max] | ours GB/s | of copy-rate limit |"
             + (" clone time / ours |" if clone else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if clone else "")]
    for r in rows:
        e, i = r["ours_over_eager_range"], r["ours_over_inductor_range"]
        lines.append(
            f"| {r['shape']} | {r['mbytes']:.1f} | {r['threads']} | {r['eager_ms']:.3f} | "
            f"{r['inductor_ms']:.3f} | {r['ours_ms']:.3f} | {r['ours_over_eager']:.2f} "
            f"[{e[0]:.2f}, {e[1]:.2f}] | {r['ours_over_inductor']:.2f} [{i[0]:.2f}, {i[1]:.2f}] "
            f"| {r['ours_gbps']:.1f} | {r['fraction_of_copy']:.0%} |"
            + (f" {r['fraction_of_clone']:.0%} |" if clone else ""))
    return "\n".join(lines) + "\n"


def family_table(rows) -> str:
    lines = ["### BN family: training forward + backward against our plain BN\n",
             "Target: variant / BN <= 1.2 (in-place ABN may pay its recomputation). Ghost BN: 4 "
             "virtual batches (N/4); renorm: r_max = 3, d_max = 5; in-place ABN: leaky ReLU "
             "(0.01), also against BN + leaky ReLU (fused). *ratio*: median [min, max] of the "
             "per-round ratio; *ratio of best*: of the fastest rounds (other jobs only add "
             "time).\n",
             "| shape | threads | variant / baseline | baseline (ms) | variant (ms) | ratio "
             "[min, max] | ratio of best |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        lines.append(
            f"| {r['shape']} | {r['threads']} | {r['variant']} / {r['baseline']} | "
            f"{r['baseline_ms']:.3f} | {r['variant_ms']:.3f} | {r['ratio']:.2f} [{lo:.2f}, "
            f"{hi:.2f}] | {r['ratio_of_best']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", type=str, default="",
                        help="only shapes whose label contains this text")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="the BN family's table (--no-variants skips it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = load_average()
    train_rows, infer_rows, family_rows = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, shape, channels_last in SHAPES:
            if args.shapes not in f"{label} {shape}":
                continue
            t, i = measure(label, shape, channels_last, threads, args.rounds, args.min_run_time)
            train_rows.append(t)
            infer_rows.append(i)
            print("training", table([t], "", "").splitlines()[-1], flush=True)
            print("eval    ", table([i], "", "").splitlines()[-1], flush=True)
            if args.variants:
                family_rows += measure_family(label, shape, channels_last, threads,
                                              args.rounds, args.min_run_time)
                for line in family_table(family_rows).splitlines()[-len(COMPARISONS):]:
                    print("BN family", line, flush=True)
    device = machine_description()
    options = (f"--threads {' '.join(map(str, args.threads))} --rounds {args.rounds} "
               f"--min-run-time {args.min_run_time}"
               + ("" if args.variants else " --no-variants")
               + (f" --shapes {args.shapes!r}" if args.shapes else ""))
    load = f"load average (1 min) {load_before} before, {load_average()} after"
    text = (
        f"# CPU benchmark: ours vs torch eager vs Inductor, float32\n\n"
        f"Device: {device}; torch {torch.__version__}. Command: `python benchmarks/cpu.py "
        f"{options}`. {args.rounds} alternating rounds of `torch.utils.benchmark` "
        f"medians (1 thread: CPU time of the calling thread; 2 threads: wall time); times "
        f"are medians over rounds, ratios the median of per-round ratios [min, max]. "
        f"Inductor: `torch.compile` of torch.nn's module. Hardware limit: the same-size "
        f"`copy_` rate, timed in the same rounds. Machine shared with other jobs: {load}.\n\n"
        + table(train_rows, "Training forward + backward",
                f"Targets: ours <= min(eager, Inductor); of copy-rate limit (2.5 x copy time / "
                f"ours: a step moves at least {MIN_TENSORS_MOVED} tensors) >= 50% from "
                f"{LARGE_BYTES // 2**20} MB on.")
        + "\n"
        + table(infer_rows, "Eval (inference) forward, under torch.no_grad()",
                "Target: within 10% of a copy on large tensors (one pass, as a copy). Two "
                "copies for reference: `dst.copy_(x)` into a buffer kept from call to call "
                "(the copy-rate limit) and `x.clone()`, which allocates its output as an eval "
                "forward must.")
        + ("\n" + family_table(family_rows) if args.variants else "")
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", processor_name()).strip("-")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(
        dict(device=device, torch=torch.__version__, rounds=args.rounds,
             min_run_time=args.min_run_time, load=load, training=train_rows, eval=infer_rows,
             **({"variants": family_rows} if args.variants else {})),
        indent=2))
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
