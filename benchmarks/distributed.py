"""Synchronized BN: bytes exchanged per BN layer per step, and data-parallel step time.

    python benchmarks/distributed.py [--world 2] [--device cpu|cuda] [--rounds 10] [--steps 10]

Spawns ``--world`` processes (gloo on the CPU, one thread each; NCCL with one GPU per process
on CUDA), each training the same small CNN under DistributedDataParallel on its own
``--batch-size`` images, once with plain per-process BN (``batchnorm.BatchNorm2d``) and once
with ``batchnorm.convert(model, sync=True)``. The two variants alternate in ``--rounds`` rounds
of ``--steps`` timed steps (after ``--warmup``), so a change in machine load hits both; the
table gives the median step time over all timed steps, measured on rank 0.

Bytes are what SyncBatchNorm's collectives carry, recorded from the Function itself
(:func:`batchnorm.distributed.record_traffic`) during one step: the forward ``all_gather`` of
``(count, mean, M2)`` and the backward ``all_reduce`` of ``(sum dy, sum dy*xhat)``. "Payload" is
the tensor each process hands to the collective; "received" is what an all_gather delivers to
each process from the others; the ring estimate for an all_reduce is the ``2 (W-1)/W x payload``
a ring algorithm sends per process. DDP's own gradient all_reduce is given for scale.

Writes benchmarks/results/distributed-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from cpu import processor_name  # benchmarks/cpu.py, next to this script
from torch import nn

import batchnorm
from batchnorm.distributed import SyncBatchNorm, record_traffic

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("plain BN (per process)", "SyncBatchNorm")


def small_cnn(widths: tuple[int, ...]) -> nn.Module:
    """conv3x3-BN-ReLU blocks (stride 2 after the first), global average pool, linear."""
    layers, channels = [], 3
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1,
                             bias=False),
                   batchnorm.BatchNorm2d(width), nn.ReLU(inplace=True)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def _worker(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                    generator=generator).to(device)
    target = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    models = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = small_cnn(args.widths).to(device)
        if variant == "SyncBatchNorm":
            model = batchnorm.convert(model, sync=True)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        models[variant] = (ddp, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def step(variant: str) -> float:
        ddp, opt = models[variant]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), target).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for variant in VARIANTS:
        for _ in range(args.warmup):
            step(variant)
    with record_traffic() as traffic:
        step("SyncBatchNorm")
    times = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            dist.barrier()
            times[variant] += [step(variant) for _ in range(args.steps)]
    sync_model = models["SyncBatchNorm"][0].module
    layers = [(name, m.num_features) for name, m in sync_model.named_modules()
              if isinstance(m, SyncBatchNorm)]
    gradient_bytes = sum(p.numel() * p.element_size() for p in sync_model.parameters())
    if rank == 0:
        torch.save(dict(times=times, traffic=list(traffic), layers=layers,
                        gradient_bytes=gradient_bytes), out_file)
    dist.barrier()
    dist.destroy_process_group()


def per_layer_bytes(traffic, layers, world: int) -> list[dict]:
    """Pair the forward all_gathers (layer order) and backward all_reduces (reverse order)."""
    gathers = [size for op, size in traffic if op == "all_gather"]
    reduces = [size for op, size in traffic if op == "all_reduce"][::-1]
    if not (len(gathers) == len(reduces) == len(layers)):
        raise RuntimeError(f"expected one all_gather and one all_reduce per BN layer, got "
                           f"{traffic} for {len(layers)} layers")
    rows = []
    for (name, channels), gather, reduce in zip(layers, gathers, reduces, strict=True):
        if (gather, reduce) != ((2 * channels + 2) * 4, 2 * channels * 4):
            raise RuntimeError(f"{name}: payloads {gather}, {reduce} B are not (2C+2) and 2C "
                               f"float32 values for C={channels}")
        rows.append(dict(layer=name, channels=channels, forward_payload=gather,
                         forward_received=(world - 1) * gather, backward_payload=reduce,
                         backward_ring_sent=round(2 * (world - 1) / world * reduce)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="number of processes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")),
                        default=(32, 64, 128), help="conv widths, comma-separated")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"--device cuda needs {args.world} GPUs (one per process), found "
              f"{torch.cuda.device_count()}")
        return 1
    load = os.getloadavg()[0]  # other work on the machine skews CPU timings
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rank0.pt")
        mp.spawn(_worker, args=(args.world, str(Path(tmp) / "init"), args, out_file),
                 nprocs=args.world, join=True)
        result = torch.load(out_file, weights_only=False)

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else processor_name()
    medians = {v: statistics.median(result["times"][v]) * 1e3 for v in VARIANTS}
    rows = per_layer_bytes(result["traffic"], result["layers"], args.world)
    bn_bytes = sum(r["forward_payload"] + r["backward_payload"] for r in rows)
    backend = "nccl" if args.device == "cuda" else "gloo"
    n_steps = args.rounds * args.steps
    text = (
        f"# Synchronized BN: {args.world} processes, {backend}\n\n"
        f"Device: {device} ({os.cpu_count()} CPUs, load average {load:.1f} at the start); "
        f"torch {torch.__version__}; {args.threads} thread(s) per process. "
        f"Small CNN (conv widths {', '.join(map(str, args.widths))}; BN after every conv), "
        f"{args.batch_size} images of {args.image_size}x{args.image_size} per process, "
        f"float32, DDP + SGD.\n\n"
        "## Bytes exchanged per BN layer per training step (per process)\n\n"
        "| layer | C | forward all_gather payload | forward received | backward all_reduce "
        "payload | backward ring estimate sent |\n|---|---:|---:|---:|---:|---:|\n"
        + "".join(f"| {r['layer']} | {r['channels']} | {r['forward_payload']} B | "
                  f"{r['forward_received']} B | {r['backward_payload']} B | "
                  f"{r['backward_ring_sent']} B |\n" for r in rows)
        + f"\nPayloads are (2C+2) and 2C float32 values: ({len(rows)} layers, "
        f"{bn_bytes} B of payload per step in all, against {result['gradient_bytes']} B of "
        f"gradients in DDP's own all_reduce). Two extra collectives per BN layer per step.\n\n"
        f"## Step time (median of {n_steps} steps, rank 0, variants interleaved in "
        f"{args.rounds} rounds)\n\n"
        "| BN | step (ms) | vs plain |\n|---|---:|---:|\n"
        + "".join(f"| {v} | {medians[v]:.2f} | {medians[v] / medians[VARIANTS[0]]:.2f}x |\n"
                  for v in VARIANTS)
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "distributed-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(
        device=device, backend=backend, world=args.world, threads=args.threads,
        cpus=os.cpu_count(), load_average_at_start=load,
        torch=torch.__version__, batch_size_per_process=args.batch_size,
        image_size=args.image_size, widths=list(args.widths), bytes_per_layer=rows,
        ddp_gradient_bytes=result["gradient_bytes"], median_step_ms=medians,
        step_times_ms={v: [t * 1e3 for t in result["times"][v]] for v in VARIANTS},
    ), indent=2) + "\n")
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
