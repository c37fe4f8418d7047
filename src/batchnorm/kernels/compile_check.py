"""Compile every kernel variant the launcher uses for a GPU architecture, without a GPU.

The Triton interpreter (the CPU tests) runs the kernels' Python semantics but never lowers
them, so type or layout errors that only the compiler sees would surface first on a GPU
machine. This module drives the real launch code on CPU tensors with each kernel replaced by
a recorder, then compiles the recorded (signature, constexprs, num_warps) with
``triton.compile`` for the requested target down to a cubin (Triton ships ``ptxas``)::

    python -m batchnorm.kernels.compile_check --arch 90          # sm_90 (H100)
    python -m batchnorm.kernels.compile_check --quick      # one variant per kernel and layout
    python -m batchnorm.kernels.compile_check --dump specs.json   # record only

Must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from batchnorm.kernels import backward as _backward_mod
from batchnorm.kernels import forward as _forward_mod
from batchnorm.kernels import launch

KERNELS = {
    name: getattr(module, name)
    for module in (_forward_mod, _backward_mod)
    for name in dir(module)
    if name.startswith("bn_") and name.endswith("_kernel")
}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
           torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel in :mod:`launch`: ``kernel[grid](*args, **meta)`` records a spec."""

    def __init__(self, name: str, specs: dict):
        self.name, self.specs, self.fn = name, specs, KERNELS[name]

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, num_warps=4, **constexprs):
        # Mirror the JIT's specializations: integers equal to 1 become constants, integers and
        # data pointers divisible by 16 carry tt.divisibility=16 (what enables vector loads).
        signature, divisible, constexprs = {}, [], dict(constexprs)
        for name, value in zip(self.fn.arg_names, args, strict=False):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + _DTYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    divisible.append(name)
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int) and value == 1:
                constexprs[name] = 1
            elif isinstance(value, int):
                signature[name] = "i32" if abs(value) < 2**31 else "i64"
                if value % 16 == 0:
                    divisible.append(name)
            else:
                signature[name] = "fp32"
        for name in constexprs:
            signature[name] = "constexpr"
        spec = dict(kernel=self.name, signature=signature, constexprs=constexprs,
                    divisible=divisible, num_warps=num_warps)
        self.specs[json.dumps(spec, sort_keys=True)] = spec


def record_specs() -> list[dict]:
    """Run the launch code over layouts x dtypes x epilogues x paths; return distinct specs."""
    specs: dict = {}
    saved = {name: getattr(launch, name) for name in KERNELS if hasattr(launch, name)}
    try:
        for name in saved:
            setattr(launch, name, _Recorder(name, specs))
        for shape, channels_last, dtype, (act, with_z), splits in itertools.product(
            [(4, 6, 5, 7), (8, 6)], [False, True], [torch.float32, torch.bfloat16],
            [(None, False), ("silu", True), ("relu", False)], [1, 3],
        ):
            if channels_last and len(shape) != 4:
                continue
            x = torch.empty(shape, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            c = shape[1]
            w, b = torch.empty(c), torch.empty(c)
            z = torch.empty_like(x) if with_z else None
            with launch.configure(splits=splits, tile=32):
                y, mean, var = launch.forward_train(x, w, b, z, 1e-5, act)
                launch.forward_train(x, w, b, z, 1e-5, act, torch.empty(c), torch.empty(c), 0.1)
                launch.update_running_stats(torch.empty(c), torch.empty(c), mean, var, 0.1, 9)
                launch.forward_eval(x, mean, var, None, b, z, 1e-5, act)
                for training in (True, False):
                    launch.backward(y, x, w, b, z, mean, var, training, 1e-5, act,
                                    need_dx=True, need_dweight=True, need_dbias=True,
                                    need_dresidual=with_z)
                launch.backward(y, x, None, None, z, mean, var, False, 1e-5, act,
                                need_dx=True, need_dresidual=with_z)
    finally:
        for name, kernel in saved.items():
            setattr(launch, name, kernel)
    return list(specs.values())


def compile_specs(specs: list[dict], arch: int, log=print) -> list[str]:
    """Compile each spec for ``sm_<arch>``; return the failures as messages."""
    target = GPUTarget("cuda", arch, 32)
    failures = []
    for i, spec in enumerate(specs):
        fn = KERNELS[spec["kernel"]]
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in spec["divisible"]}
        source = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                           attrs=attrs)
        start = time.perf_counter()
        try:
            triton.compile(source, target=target, options={"num_warps": spec["num_warps"]})
        except Exception as error:  # report every failing variant, not just the first
            failures.append(f"{spec['kernel']} {spec['constexprs']}: {error}")
        log(f"[{i + 1}/{len(specs)}] {spec['kernel']} {time.perf_counter() - start:.1f}s")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--dump", help="write the recorded specs to this JSON file and stop")
    parser.add_argument("--specs", help="compile the specs from this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="only the first variant of each kernel and layout")
    args = parser.parse_args(argv)
    if args.specs:
        with open(args.specs) as f:
            specs = json.load(f)
    else:
        specs = record_specs()
    if args.quick:
        firsts = {}
        for spec in specs:
            firsts.setdefault((spec["kernel"], spec["constexprs"].get("ROWS")), spec)
        specs = list(firsts.values())
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(specs, f, indent=1)
        print(f"{len(specs)} kernel variants written to {args.dump}")
        return 0
    failures = compile_specs(specs, args.arch)
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    print(f"{len(specs) - len(failures)}/{len(specs)} variants compiled for sm_{args.arch} "
          f"with Triton {triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
