"""End to end: one training step of a ResNet-50-sized network, our BN against torch's.

    python benchmarks/resnet_step.py                    # bf16, channels_last, batch 128, GPU
    python benchmarks/resnet_step.py --no-compile --batch-size 64
    python benchmarks/resnet_step.py --dry-run --no-compile   # CPU check of the script

The network is ResNet-50 (bottlenecks [3, 4, 6, 3], width 64, 224x224 inputs, 1000 classes),
all in bfloat16 with channels_last activations, SGD with momentum. Two normalizations:

``torch``: ``torch.nn.BatchNorm2d``, then ``out += identity`` and ``ReLU(inplace=True)``
    exactly like torchvision's ResNet;
``ours``: ``batchnorm.BatchNorm2d(..., activation="relu", backend="triton")``, with the
    residual add and ReLU fused into the BN kernels (``bn3(x, residual=identity)``).

Both start from the same weights. The step (zero_grad, forward, cross-entropy, backward,
optimizer step) is timed with CUDA events, median over ``--steps`` steps after warm-up, eager and
under ``torch.compile`` (``fullgraph=True``). Reported: ms per step and the speedup
torch ms / ours ms. Targets (issue 3): >= 1.15x in eager mode, >= 1.0x under torch.compile.
Results go to ``benchmarks/results/<device>-resnet50.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--layers", default="3,4,6,3", help="bottlenecks per stage")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile included)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode only")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; a temporary "
                        "directory for --dry-run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, a tiny network, one step: checks the "
                        "script, measures nothing meaningful")
    args = parser.parse_args(argv)
    args.layer_list = [int(n) for n in args.layers.split(",")]
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "batchnorm-bench" if args.dry_run else RESULTS
    if args.dry_run:
        args.batch_size, args.image_size, args.width = 2, 64, 4  # last stage: m = 8
        args.layer_list, args.steps, args.warmup = [1, 1, 1, 1], 1, 0
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"
    return args


def build_resnet(torch, norm: str, width: int, layers: list[int], classes: int = 1000):
    """ResNet-v1.5 (stride in the 3x3 conv) with ``norm`` in {"torch", "ours"}."""
    from torch import nn

    import batchnorm

    class TorchNorm(nn.BatchNorm2d):
        """torch's BN followed by torchvision's in-place residual add and ReLU."""

        def __init__(self, channels, activation):
            super().__init__(channels)
            self.activation = activation

        def forward(self, x, residual=None):
            y = super().forward(x)
            if residual is not None:
                y += residual
            return torch.relu_(y) if self.activation == "relu" else y

    def make_norm(channels, activation):
        if norm == "torch":
            return TorchNorm(channels, activation)
        return batchnorm.BatchNorm2d(channels, activation=activation, backend="triton")

    def conv(cin, cout, k, stride=1):
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * 4
            self.conv1, self.bn1 = conv(cin, planes, 1), make_norm(planes, "relu")
            self.conv2, self.bn2 = conv(planes, planes, 3, stride), make_norm(planes, "relu")
            self.conv3, self.bn3 = conv(planes, cout, 1), make_norm(cout, "relu")
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv(cin, cout, 1, stride), make_norm(cout, None))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            return self.bn3(self.conv3(out), identity)  # relu(BN(conv3) + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv(3, width, 7, 2), make_norm(width, "relu")
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks, cin = [], width
            for stage, count in enumerate(layers):
                planes = width * 2**stage
                for i in range(count):
                    blocks.append(Bottleneck(cin, planes, 2 if i == 0 and stage > 0 else 1))
                    cin = planes * 4
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.blocks(self.pool(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def time_steps(torch, step, device, warmup: int, steps: int) -> tuple[float, float]:
    """(median ms per step, loss of the first step)."""
    first = float(step())
    for _ in range(max(warmup - 1, 0)):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), first
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), first


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen,
                         device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=gen, device=device)
    torch.manual_seed(args.seed)
    reference = build_resnet(torch, "torch", args.width, args.layer_list)
    results = {}
    for mode in ["eager"] + ([] if args.no_compile else ["compile"]):
        for norm in ("torch", "ours"):
            model = build_resnet(torch, norm, args.width, args.layer_list)
            model.load_state_dict(reference.state_dict())  # the same start for both
            model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            forward = model
            if mode == "compile":
                torch._dynamo.reset()
                forward = torch.compile(model, fullgraph=True, backend=args.compile_backend)

            def step(forward=forward, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(forward(images).float(), labels)
                loss.backward()
                optimizer.step()
                return loss.detach()

            ms, loss = time_steps(torch, step, device, args.warmup, args.steps)
            results[(mode, norm)] = dict(mode=mode, norm=norm, ms=ms, first_loss=loss)
            print(f"{mode:8s} {norm:6s} {ms:9.2f} ms/step  (first loss {loss:.4f})", flush=True)
            del model, optimizer, forward
    return results


def report(args, results: dict, device_name: str, versions: dict) -> tuple[str, dict]:
    rows, lines = [], []
    for mode in ("eager", "compile"):
        if (mode, "ours") not in results:
            continue
        torch_ms, ours_ms = results[(mode, "torch")]["ms"], results[(mode, "ours")]["ms"]
        target = 1.15 if mode == "eager" else 1.0
        speedup = torch_ms / ours_ms
        rows.append(dict(mode=mode, torch_ms=torch_ms, ours_ms=ours_ms, speedup=speedup,
                         target=target, torch_first_loss=results[(mode, "torch")]["first_loss"],
                         ours_first_loss=results[(mode, "ours")]["first_loss"]))
        lines.append(f"| {mode} | {torch_ms:.2f} | {ours_ms:.2f} | {speedup:.3f}x | "
                     f">= {target}x | {'met' if speedup >= target else 'NOT met'} |")
    meta = dict(device=device_name, date=datetime.datetime.now().isoformat(timespec="minutes"),
                batch_size=args.batch_size, image_size=args.image_size, width=args.width,
                layers=args.layer_list, steps=args.steps, warmup=args.warmup,
                compile_backend=None if args.no_compile else args.compile_backend,
                dry_run=args.dry_run, **versions)
    text = "\n".join([
        f"# ResNet-50 training step on {device_name}", "",
        f"Measured {meta['date']}: torch {versions['torch']}, Triton {versions['triton']}; "
        f"bfloat16, channels_last, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"layers {args.layer_list}, width {args.width}; median of {args.steps} steps after "
        f"{args.warmup} warm-up. Speedup = torch ms / ours ms.", "",
        *(["**DRY RUN on CPU under the Triton interpreter: the numbers mean nothing.**", ""]
          if args.dry_run else []),
        "| mode | torch BN ms/step | our BN ms/step | speedup | target | |",
        "|---|--:|--:|--:|--:|---|", *lines, ""])
    return text, dict(meta=meta, rows=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before batchnorm.kernels is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/resnet_step.py needs a CUDA GPU and none is available. "
              "(`--dry-run` checks the script on CPU under the Triton interpreter.)",
              file=sys.stderr)
        return 2
    import triton

    name = torch.cuda.get_device_name() if not args.dry_run else "dry-run-cpu"
    results = run(args)
    text, data = report(args, results, name,
                        dict(torch=torch.__version__, triton=triton.__version__))
    args.out.mkdir(parents=True, exist_ok=True)
    from kernels import device_slug  # benchmarks/kernels.py, next to this file

    stem = args.out / f"{device_slug(name)}-resnet50"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
