"""The floor under a channels-last training step on the CPU: the four passes over memory such a
step cannot avoid (a channel's values span the whole tensor, so each direction reads it once to
reduce and once more to write the output), done with ATen's own streaming kernels on the same
memory: ``x.sum()``, ``x * 1`` (forward), ``dot(x, dy)``, ``x + dy`` (backward). Their
reductions go to one number, simpler than per-channel ones, so this is an optimistic floor.

Prints, per thread count and shape, the fraction of the copy-rate limit (``benchmarks/cpu.py``:
2.5 x the time of a same-size ``copy_``) that the four passes and our training step reach, timed
in alternation (5 rounds). Takes about a minute::

    python benchmarks/channels_last_floor.py
"""

from __future__ import annotations

import statistics

import torch
from cpu import timer

import batchnorm

SHAPES = ((32, 64, 28, 28), (16, 128, 56, 56))


def measure(shape, rounds: int = 5, min_run_time: float = 0.2) -> dict[str, float]:
    x = (torch.randn(shape) * 2 + 1).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    dst = torch.empty_like(x)
    flat_x, flat_dy = (t.permute(0, 2, 3, 1).reshape(-1) for t in (x, dy))  # views
    xg = x.clone().requires_grad_()
    module = batchnorm.BatchNorm2d(shape[1])

    def four_passes():
        x.sum()
        x * 1
        torch.dot(flat_x, flat_dy)
        x + dy

    def ours():
        xg.grad = None
        module.zero_grad(set_to_none=True)
        module(xg).backward(dy)

    fns = {"copy": lambda: dst.copy_(x), "four passes": four_passes, "ours": ours}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn, min_run_time))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            t = measure(shape)
            limit = 2.5 * t["copy"]
            print(f"{threads} thread(s), {shape} channels_last: copy {t['copy'] * 1e3:.3f} ms; "
                  f"four ATen passes {t['four passes'] * 1e3:.3f} ms = "
                  f"{limit / t['four passes']:.0%} of the copy-rate limit; ours "
                  f"{t['ours'] * 1e3:.3f} ms = {limit / t['ours']:.0%}", flush=True)


if __name__ == "__main__":
    main()
