"""GPU benchmark: our Triton BN kernels against torch eager and torch.compile.

    python benchmarks/kernels.py                          # the full table (CUDA GPU)
    python benchmarks/kernels.py --dtypes bfloat16 --merge --no-compile   # a part, merged
    python benchmarks/kernels.py --dry-run --no-compile   # CPU: checks the script itself

First the device's copy bandwidth is measured (``dst.copy_(src)`` on 1 GiB). Then for every
shape x dtype x layout, the median time (CUDA events, after warm-up, L2 flushed before each
call) of

* ``train_fwd`` (training forward, running statistics updated), ``eval_fwd`` and ``fwd_bwd``
  (training forward + backward for input, weight and bias) of ``ours``
  (``batchnorm.functional.batch_norm(backend="triton")``), ``eager`` (``F.batch_norm``) and
  ``compile`` (``torch.compile(F.batch_norm, fullgraph=True)``, the compiler reset between
  shapes so it never silently falls back or reuses a graph);
* the fused epilogues ``relu`` and ``relu_add``, ``fwd_bwd``: ours fused
  (``activation="relu", residual=z``), ours unfused (ours BN, then torch add and ReLU), eager and
  compiled ``relu(batch_norm(x) + z)``.

Each time is reported in ms, as a speedup over eager (eager time / time) and as a percentage of
the ideal floor: the bytes a perfect kernel must move at the measured copy bandwidth, i.e.
``passes x bytes(x) / bandwidth`` with passes = 2 for a forward (read x, write y), 5 for
forward+backward (x, y; x, dy, dx), 5 for BN+ReLU and 8 for BN+add+ReLU (adds z read in both
directions and dz written). Results go to ``benchmarks/results/<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(256, 64, 56, 56), (128, 256, 28, 28), (64, 512, 14, 14), (32, 64, 112, 112),
          (64, 3, 224, 224), (32, 64, 8, 8), (8192, 4096)]
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "nhwc")  # 2-D shapes have a single layout, reported as "nc"
MODES = {"train_fwd": 2, "eval_fwd": 2, "fwd_bwd": 5}  # -> passes of the ideal floor
EPILOGUES = {"relu": 5, "relu_add": 8}  # fused BN + epilogue, forward + backward
IMPLS = ("ours", "eager", "compile")
FUSED_IMPLS = ("ours", "ours_unfused", "eager", "compile")
TARGETS = """\
Targets (issue 3): fwd_bwd >= 60% of the ideal floor on every shape and >= 70% geometric mean
(>= 2.5x eager's geometric mean), faster than torch.compile on every shape; eval_fwd >= 85%
of copy bandwidth; fused BN+ReLU(+add) fwd_bwd >= 1.3x faster than ours unfused."""


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: str
    layout: str

    @property
    def name(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=TARGETS)
    parser.add_argument("--shapes", help="comma-separated, e.g. 256x64x56x56,8192x4096 "
                        "(default: the issue's seven shapes)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="float32,bfloat16")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="nchw,nhwc (4-D shapes)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused epilogues")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-flush", action="store_true",
                        help="do not flush the L2 cache before each timed call")
    parser.add_argument("--merge", action="store_true",
                        help="update the existing results file instead of replacing it")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; a temporary "
                        "directory for --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes, wall-clock timing, one "
                        "call each: checks the script, measures nothing meaningful")
    args = parser.parse_args(argv)
    args.shape_list = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
                       if args.shapes else SHAPES)
    args.dtype_list = _choices(args.dtypes, DTYPES, "--dtypes")
    args.layout_list = _choices(args.layouts, LAYOUTS, "--layouts")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "batchnorm-bench" if args.dry_run else RESULTS
    if args.dry_run:
        args.reps, args.warmup, args.no_flush = 1, 0, True
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"  # no GPU code generation on CPU
    return args


def _choices(text: str, allowed, flag: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {list(allowed)}, "
                         f"got {text!r}")
    return values


def cases(args) -> list[Case]:
    out = []
    for shape in args.shape_list:
        for dtype in args.dtype_list:
            layouts = args.layout_list if len(shape) > 2 else ["nc"]
            out += [Case(shape, dtype, layout) for layout in layouts]
    return out


def dry_run_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tiny stand-in with the same rank for the interpreter."""
    if len(shape) == 2:
        return (min(shape[0], 9), min(shape[1], 7))
    return (min(shape[0], 2), min(shape[1], 5), *(min(s, 3) for s in shape[2:]))


# --- timing ----------------------------------------------------------------------------------

class Timer:
    """Median milliseconds of ``fn()``: CUDA events on the GPU, wall clock in a dry run."""

    def __init__(self, torch, device, reps: int, warmup: int, flush: bool):
        self.torch, self.device, self.reps, self.warmup = torch, device, reps, warmup
        self.flush = (torch.empty(256 * 2**20, dtype=torch.int8, device=device)
                      if flush and device.type == "cuda" else None)

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            if self.flush is not None:
                self.flush.zero_()  # evict the operands from L2, outside the timed region
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(torch, device, timer: Timer, nbytes: int) -> float:
    """GB/s of ``dst.copy_(src)``: nbytes read + nbytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --- the implementations ---------------------------------------------------------------------

def make_fn(torch, impl, training, activation, with_residual, params, compile_backend):
    """``fn(x, z) -> y`` for one implementation; ``activation``/residual only in epilogues."""
    import torch.nn.functional as F

    import batchnorm

    running_mean, running_var, weight, bias = params

    def epilogue(y, z):
        if with_residual:
            y = y + z
        return F.relu(y) if activation == "relu" else y

    if impl in ("ours", "ours_unfused"):
        fused = impl == "ours"

        def fn(x, z):
            y = batchnorm.functional.batch_norm(
                x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                activation=activation if fused else None,
                residual=z if fused and with_residual else None, backend="triton",
            )
            return y if fused else epilogue(y, z)

        return fn

    def fn(x, z):
        return epilogue(F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1,
                                     1e-5), z)

    if impl == "compile":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=compile_backend)
    return fn


def make_inputs(torch, case: Case, device, shape):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    memory_format = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format

    def randn(*size, **kw):
        t = torch.randn(*size, generator=gen, device=device, **kw)
        return t.to(dtype).contiguous(memory_format=memory_format) if len(size) > 1 else t

    C = shape[1]
    x, z, dy = randn(*shape), randn(*shape), randn(*shape)
    params = (torch.zeros(C, device=device), torch.ones(C, device=device),
              torch.rand(C, generator=gen, device=device).add_(0.5).requires_grad_(True),
              randn(C).requires_grad_(True))
    return x, z, dy, params


def make_runner(torch, fn, mode, x, z, dy, params, with_residual):
    if mode != "fwd_bwd":
        def run():
            with torch.no_grad():
                fn(x, z)
        return run
    xg = x.detach().requires_grad_(True)
    zg = z.detach().requires_grad_(with_residual)
    wrt = [xg, params[2], params[3]] + ([zg] if with_residual else [])

    def run():
        torch.autograd.grad(fn(xg, zg), wrt, dy)
    return run


def bench_case(torch, case: Case, args, timer: Timer, bandwidth: float, device) -> list[dict]:
    shape = dry_run_shape(case.shape) if args.dry_run else case.shape
    x, z, dy, params = make_inputs(torch, case, device, shape)
    nbytes = x.numel() * x.element_size()
    torch._dynamo.reset()  # a fresh compiler per shape: no reuse, no silent fallback
    impls = [i for i in IMPLS if i != "compile" or not args.no_compile]
    rows = []

    def record(section, mode, impl, passes, run):
        ms = timer(run)
        floor = passes * nbytes / (bandwidth * 1e9) * 1e3
        rows.append(dict(shape=list(case.shape), run_shape=list(shape), dtype=case.dtype,
                         layout=case.layout, section=section, mode=mode, impl=impl, ms=ms,
                         floor_ms=floor, pct_floor=100 * floor / ms))

    for mode, passes in MODES.items():
        training = mode != "eval_fwd"
        for impl in impls:
            fn = make_fn(torch, impl, training, None, False, params, args.compile_backend)
            record("bn", mode, impl, passes, make_runner(torch, fn, mode, x, z, dy, params, False))
    if not args.no_fused:
        for epilogue, passes in EPILOGUES.items():
            with_residual = epilogue.endswith("_add")
            for impl in FUSED_IMPLS:
                if impl == "compile" and args.no_compile:
                    continue
                fn = make_fn(torch, impl, True, "relu", with_residual, params,
                             args.compile_backend)
                record("fused", epilogue, impl, passes,
                       make_runner(torch, fn, "fwd_bwd", x, z, dy, params, with_residual))
    torch._dynamo.reset()
    return _with_ratios(rows)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Add ``x_eager`` (eager ms / ms) and, for fused rows, ``x_unfused``."""
    by_key = {(r["section"], r["mode"], r["impl"]): r for r in rows}
    for r in rows:
        eager = by_key.get((r["section"], r["mode"], "eager"))
        r["x_eager"] = eager["ms"] / r["ms"] if eager else None
        unfused = by_key.get((r["section"], r["mode"], "ours_unfused"))
        r["x_unfused"] = unfused["ms"] / r["ms"] if unfused and r["section"] == "fused" else None
    return rows


# --- reporting -------------------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return (tuple(row["shape"]), row["dtype"], row["layout"], row["section"], row["mode"],
            row["impl"])


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(rows: list[dict]) -> list[str]:
    """Target checks over whatever was measured."""

    def pick(section, mode, impl):
        return [r for r in rows if (r["section"], r["mode"], r["impl"]) == (section, mode, impl)]

    lines = []
    fb = {impl: pick("bn", "fwd_bwd", impl) for impl in IMPLS}
    if fb["ours"]:
        pct = [r["pct_floor"] for r in fb["ours"]]
        lines.append(f"- fwd_bwd, ours: {min(pct):.0f}% of the floor at worst "
                     f"(target >= 60), geometric mean {geomean(pct):.0f}% (target >= 70)")
        for impl in ("eager", "compile"):
            if fb[impl]:
                lines.append(f"- fwd_bwd, {impl}: geometric mean "
                             f"{geomean(r['pct_floor'] for r in fb[impl]):.0f}% of the floor")
        lines.append(f"- fwd_bwd, ours vs eager: {geomean(r['x_eager'] for r in fb['ours']):.2f}x"
                     " geometric-mean speedup (target >= 2.5x)")
        compiled = {row_key(r)[:3]: r["ms"] for r in fb["compile"]}
        slower = [f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}"
                  for r in fb["ours"] if compiled.get(row_key(r)[:3], math.inf) < r["ms"]]
        if compiled:
            lines.append(f"- fwd_bwd, ours slower than torch.compile on {len(slower)} of "
                         f"{len(fb['ours'])} cases (target 0)" +
                         (f": {', '.join(slower)}" if slower else ""))
    ev = pick("bn", "eval_fwd", "ours")
    if ev:
        pct = [r["pct_floor"] for r in ev]
        lines.append(f"- eval_fwd, ours: {min(pct):.0f}% of copy bandwidth at worst, geometric "
                     f"mean {geomean(pct):.0f}% (target >= 85)")
    for epilogue in EPILOGUES:
        fused = pick("fused", epilogue, "ours")
        if fused:
            gains = [r["x_unfused"] for r in fused if r["x_unfused"]]
            lines.append(f"- fused BN+{epilogue} fwd_bwd vs ours unfused: {min(gains):.2f}x at "
                         f"worst, {geomean(gains):.2f}x geometric mean (target >= 1.3x)")
    return lines


def render_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Triton BN kernels on {meta['device']}", "",
             f"Measured {meta['date']} with `{meta['command']}`: torch {meta['torch']}, "
             f"Triton {meta['triton']}, copy bandwidth {meta['copy_GBps']:.0f} GB/s; median of "
             f"{meta['reps']} calls after {meta['warmup']} warm-up, L2 "
             f"{'not ' if not meta['flush'] else ''}flushed before each call. "
             "`x eager` = eager ms / ms; `% floor` = ideal floor / ms "
             "(see benchmarks/README.md).", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN on CPU under the Triton interpreter: the numbers mean nothing.**", ""]
    lines += ["## Summary", "", *summarize(rows), "", TARGETS, ""]
    index = {row_key(r): r for r in rows}
    configs = sorted({row_key(r)[:3] for r in rows}, key=lambda k: (_shape_order(k[0]), k[1:]))

    def cell(config, section, mode, impl, field, spec):
        r = index.get((*config, section, mode, impl))
        return _fmt(r and r[field], spec)

    lines += ["## BatchNorm", "",
              "| shape | dtype | layout | mode | ours ms | eager ms | compile ms | ours x eager |"
              " compile x eager | ours % floor | eager % floor | compile % floor |",
              "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for config in configs:
        for mode in MODES:
            if (*config, "bn", mode, "ours") not in index:
                continue
            c = [cell(config, "bn", mode, i, "ms", ".3f") for i in IMPLS]
            c += [cell(config, "bn", mode, i, "x_eager", ".2f") for i in ("ours", "compile")]
            c += [cell(config, "bn", mode, i, "pct_floor", ".0f") for i in IMPLS]
            lines.append(f"| {'x'.join(map(str, config[0]))} | {config[1]} | {config[2]} | "
                         f"{mode} | " + " | ".join(c) + " |")
    if any(r["section"] == "fused" for r in rows):
        lines += ["", "## Fused BN + epilogue, forward + backward", "",
                  "| shape | dtype | layout | epilogue | fused ms | ours unfused ms | eager ms |"
                  " compile ms | fused x unfused | fused x eager | fused % floor |",
                  "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for config in configs:
            for epilogue in EPILOGUES:
                if (*config, "fused", epilogue, "ours") not in index:
                    continue
                c = [cell(config, "fused", epilogue, i, "ms", ".3f") for i in FUSED_IMPLS]
                c += [cell(config, "fused", epilogue, "ours", f, ".2f")
                      for f in ("x_unfused", "x_eager")]
                c += [cell(config, "fused", epilogue, "ours", "pct_floor", ".0f")]
                lines.append(f"| {'x'.join(map(str, config[0]))} | {config[1]} | {config[2]} | "
                             f"{epilogue} | " + " | ".join(c) + " |")
    return "\n".join(lines) + "\n"


def _shape_order(shape) -> int:
    return SHAPES.index(shape) if shape in SHAPES else len(SHAPES)


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def write_results(out: Path, slug: str, meta: dict, rows: list[dict], merge: bool):
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{slug}.json", out / f"{slug}.md"
    if merge and json_path.exists():
        old = json.loads(json_path.read_text())
        fresh = {row_key(r) for r in rows}
        rows = [r for r in old["rows"] if row_key(r) not in fresh] + rows
        meta = {**meta, "merged_into": old["meta"]}
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md_path.write_text(render_markdown(meta, rows))
    return md_path, json_path


# --- main ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before batchnorm.kernels is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU and none is available. "
              "(`--dry-run` checks the script on CPU under the Triton interpreter.)",
              file=sys.stderr)
        return 2
    import triton

    import batchnorm.kernels as kernels

    device = torch.device("cuda" if not args.dry_run else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "dry-run-cpu"
    timer = Timer(torch, device, args.reps, args.warmup, flush=not args.no_flush)
    bandwidth = copy_bandwidth(torch, device, timer, 2**30 if device.type == "cuda" else 2**20)
    print(f"{name}: copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="minutes"),
                command=" ".join(["python benchmarks/kernels.py", *(argv or sys.argv[1:])]),
                copy_GBps=bandwidth, reps=args.reps, warmup=args.warmup, flush=not args.no_flush,
                compile_backend=None if args.no_compile else args.compile_backend,
                dry_run=args.dry_run, kernel_config=dataclasses.asdict(kernels.get_config()))
    rows = []
    todo = cases(args)
    started = time.perf_counter()
    for i, case in enumerate(todo):
        case_rows = bench_case(torch, case, args, timer, bandwidth, device)
        rows += case_rows
        fb = {r["impl"]: r for r in case_rows if r["mode"] == "fwd_bwd" and r["section"] == "bn"}
        elapsed = time.perf_counter() - started
        print(f"[{i + 1}/{len(todo)}] {case.name}: fwd_bwd "
              + ", ".join(f"{k} {v['ms']:.3f} ms ({v['pct_floor']:.0f}%)" for k, v in fb.items())
              + f"  [{elapsed:.0f}s, ~{elapsed / (i + 1) * (len(todo) - i - 1):.0f}s left]",
              flush=True)
    md_path, json_path = write_results(args.out, device_slug(name), meta, rows, args.merge)
    print("\n".join(summarize(rows)))
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
