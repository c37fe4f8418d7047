"""``batchnorm reproduce inception``: the paper's ImageNet experiment (section 4.2, Figures 2-3).

Seven networks, all the same :class:`~batchnorm.models.inception.InceptionBN` architecture
trained with SGD with momentum (0.9) on mini-batches of 32:

=================  ===  =========  =======  ===========  ========  ===  ==========================
variant            BN   nonlin.    LR       weight decay  LR decay  LRN  dropout
=================  ===  =========  =======  ===========  ========  ===  ==========================
inception          no   ReLU       x1       x1            x1        yes  0.4
bn-baseline        yes  ReLU       x1       x1            x1        yes  0.4
bn-x5              yes  ReLU       x5       /5            6x faster no   0
bn-x30             yes  ReLU       x30      /5            6x faster no   0
bn-x5-sigmoid      yes  sigmoid    x5       /5            6x faster no   0
inception-x5       no   ReLU       x5       x1            x1        yes  0.4   (paper: diverges)
inception-sigmoid  no   sigmoid    x1       x1            x1        yes  0.4   (paper: chance)
=================  ===  =========  =======  ===========  ========  ===  ==========================

(:data:`VARIANTS` is this table in code.) "x1" is our base learning rate ``--base-lr``; the paper's
was 0.0015 on ImageNet with its (distributed) setup, which does not transfer, so we use the
largest rate at which plain Inception trains reliably on the data at hand (see the summary).
The learning rate decays in steps: ``lr(t) = lr0 * 0.96 ** floor(t / decay_every)`` (GoogLeNet
decayed 4% every 8 epochs); the accelerated variants use ``decay_every / 6``. Weight decay is L2
on convolution and linear weights (GoogLeNet's 2e-4 by default; accelerated: 4e-5). BN-Baseline
is "Inception with BN before every nonlinearity", everything else unchanged (dropout, decay,
LRN); the three accelerated networks apply the paper's section 4.2.1 changes that are about
the network and the optimizer (the other two concern ImageNet's data pipeline: training examples
are reshuffled every epoch from a seeded permutation, and no photometric distortions are used).

Training is the shared :class:`~batchnorm.repro.trainer.Trainer` (checkpoints, resume,
evaluation, divergence detection, bfloat16 autocast and channels_last on CUDA, DDP under
``torchrun``); the figure, table and summary are :mod:`batchnorm.repro.inception_report`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from batchnorm.models.inception import InceptionBN
from batchnorm.repro import interrupt, seeds
from batchnorm.repro.common import (
    add_data_arguments,
    check_arguments,
    is_main_process,
    log,
    moved_names,
    prepare_out_dir,
    seed_everything,
    setup_run,
    world_size,
    write_json,
)
from batchnorm.repro.image_data import Data, load_for
from batchnorm.repro.inception_report import write_report, write_seeds
from batchnorm.repro.trainer import TrainSpec, synchronized, train

# --------------------------------------------------------------------------------------------
# the variants (the paper's Figure 3 networks and its two failure cases)


@dataclass(frozen=True)
class Variant:
    """One network of section 4.2 and the paper's result for it (ImageNet, top-1)."""

    name: str
    bn: bool
    activation: str
    lr_multiplier: float
    accelerated: bool  # the section 4.2.1 changes: wd / 5, decay 6x faster, no dropout, no LRN
    paper_lr: float
    paper_steps: float | None  # steps to reach Inception's 72.2%; None = never
    paper_max_accuracy: float | None
    paper_note: str = ""

    @property
    def dropout(self) -> float:
        return 0.0 if self.accelerated else GOOGLENET_DROPOUT

    @property
    def lrn(self) -> bool:
        return not self.accelerated

    @property
    def weight_decay_divisor(self) -> float:
        return 5.0 if self.accelerated else 1.0

    @property
    def decay_speedup(self) -> float:
        return 6.0 if self.accelerated else 1.0

    def learning_rate(self, base: float) -> float:
        return base * self.lr_multiplier

    def weight_decay(self, base: float) -> float:
        return base / self.weight_decay_divisor

    def decay_every(self, base: int) -> int:
        return max(1, round(base / self.decay_speedup))


GOOGLENET_DROPOUT = 0.4
PAPER_BASE_LR = 0.0015
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("inception", False, "relu", 1, False, 0.0015, 31.0e6, 0.722),
        Variant("bn-baseline", True, "relu", 1, False, 0.0015, 13.3e6, 0.727),
        Variant("bn-x5", True, "relu", 5, True, 0.0075, 2.1e6, 0.730),
        Variant("bn-x30", True, "relu", 30, True, 0.045, 2.7e6, 0.748,
                "maximum reached after about 6e6 steps"),
        Variant("bn-x5-sigmoid", True, "sigmoid", 5, True, 0.0075, None, 0.698,
                "never reaches 72.2%"),
        Variant("inception-x5", False, "relu", 5, False, 0.0075, None, None,
                "diverged: parameters reached machine infinity"),
        Variant("inception-sigmoid", False, "sigmoid", 1, False, 0.0015, None, None,
                "accuracy stayed at chance (1/1000)"),
    )
}

DEFAULTS = dict(base_lr=0.01, base_weight_decay=2e-4, momentum=0.9, batch_size=32)

# --------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=list(VARIANTS), default="inception",
                        help="which network to train (default: inception)")
    parser.add_argument("--all", action="store_true",
                        help="train every variant in turn, then write the figure and table")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist, cifar10 or imagefolder:PATH (PATH/train, PATH/val "
                             "in ImageNet layout)")
    add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=20_000, help="training steps per variant")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="global mini-batch (the paper's 32; split across processes)")
    parser.add_argument("--base-lr", type=float, default=DEFAULTS["base_lr"],
                        help="the x1 learning rate (x5, x30 for the faster variants)")
    parser.add_argument("--base-weight-decay", type=float,
                        default=DEFAULTS["base_weight_decay"],
                        help="L2 weight decay of the non-accelerated variants (/5 accelerated)")
    parser.add_argument("--momentum", type=float, default=DEFAULTS["momentum"])
    parser.add_argument("--decay-every", type=int, default=0,
                        help="steps between x0.96 learning-rate decays for the x1 schedule "
                             "(accelerated: /6); default: steps // 12")
    parser.add_argument("--width", type=float, default=1.0,
                        help="filter-count multiplier (1 = the paper's network)")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="train on this many examples (0: all)")
    parser.add_argument("--test-subset", type=int, default=0,
                        help="evaluate on this many test examples (0: all)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="crop size for imagefolder data sets")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--ckpt-every", type=int, default=1000)
    parser.add_argument("--ckpt-dir", default=None,
                        help="where checkpoints go (default: OUT/checkpoints)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoints (and skip finished variants; with "
                             "--seeds, finished seeds)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bfloat16 autocast on CUDA, float32 on the CPU")
    parser.add_argument("--workers", type=int, default=4,
                        help="data-loading processes (imagefolder only)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    seeds.add_arguments(parser, resume=False)
    parser.add_argument("--out", default="results/inception")
    parser.add_argument("--note", default="", help="a paragraph put at the top of summary.md")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--stop-at", type=int, default=0,
                        help="stop the variant after this step, keeping the schedule of --steps "
                             "(e.g. once a BN variant has passed plain Inception's plateau; "
                             "with --all the run stops at that variant); --resume continues it "
                             "(0: run to --steps)")


def build_model(variant: Variant, data: Data, width: float = 1.0) -> nn.Module:
    """The variant's network for ``data``: the ImageNet stem for images of 96 pixels or more,
    else the small-image stem (see :mod:`batchnorm.models.inception`)."""
    return InceptionBN(data.num_classes, data.in_channels, bn=variant.bn,
                       activation=variant.activation, dropout=variant.dropout, lrn=variant.lrn,
                       stem="imagenet" if data.image_size >= 96 else "small", width=width)


def base_decay_every(args) -> int:
    """Steps between x0.96 decays of the x1 schedule: ``--decay-every``, else ``steps // 12``.

    GoogLeNet's "4% every 8 epochs" has no meaning for runs of a few epochs; what we keep is the
    paper's proportion. The plain schedule decays 12 times in the run (to 0.61 of the initial
    rate); the accelerated one 72 times (to 0.05), so those networks anneal within the run,
    as the paper's BN-x30 reached its maximum at a fifth of Inception's training.
    """
    return args.decay_every or max(1, args.steps // 12)


def variant_spec(variant: Variant, args, device: torch.device) -> TrainSpec:
    base_decay = base_decay_every(args)
    cuda = device.type == "cuda"
    amp = args.precision == "bf16" or (args.precision == "auto" and cuda)
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else Path(args.out) / "checkpoints"
    meta = dict(variant=variant.name, dataset=args.dataset, width=args.width,
                train_subset=args.train_subset, world_size=world_size())
    return TrainSpec(
        steps=args.steps, batch_size=args.batch_size, lr=variant.learning_rate(args.base_lr),
        momentum=args.momentum, weight_decay=variant.weight_decay(args.base_weight_decay),
        decay_every=variant.decay_every(base_decay), eval_every=args.eval_every,
        seed=args.seed, checkpoint=str(ckpt_dir / f"{variant.name}.pt"),
        ckpt_every=args.ckpt_every, resume=args.resume, amp=amp, channels_last=cuda,
        workers=args.workers, progress=args.progress, label=variant.name, stop_at=args.stop_at,
        meta=meta,
    )


def run(args) -> int:
    check_arguments(args, positive=("width", "base_lr"), at_least=dict(
        steps=1, batch_size=1, eval_every=1, ckpt_every=0, base_weight_decay=0, momentum=0,
        decay_every=0, image_size=1, workers=0, stop_at=0))
    device = setup_run(args)
    several = args.seeds > 1

    def one(args) -> int | str:
        if args.ckpt_dir and several:  # each seed its own checkpoints
            args.ckpt_dir = str(seeds.seed_folder(args.ckpt_dir, args.seed))
        return run_one(args, device)

    return seeds.run_command(args, one, "inception", write_seeds)


def run_one(args, device) -> int | str:
    """One seed: train the variants (``--variant`` or ``--all``) into ``--out`` and write the
    report; :data:`batchnorm.repro.seeds.STOPPED` if ``--stop-at`` stopped a variant."""
    data = load_for(args, image_size=args.image_size)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    if args.ckpt_dir:  # found now, not at the first checkpoint
        prepare_out_dir(args.ckpt_dir, "--ckpt-dir")
    names = list(VARIANTS) if args.all else [args.variant]
    n_train, n_test = data.sizes()
    log(f"inception: {data.name} ({n_train} train / {n_test} test, {data.num_classes} classes), "
        f"variants {', '.join(names)}, {args.steps} steps of {args.batch_size} on {device}"
        + (f" x {world_size()} processes" if world_size() > 1 else ""))
    for name in names:
        record_path = out / name / "history.json"
        if args.resume and _finished(record_path, args):
            log(f"{name}: already finished ({record_path}), skipping")
            continue
        result = train_variant(VARIANTS[name], args, data, device, record_path)
        if result["stopped_by"] == "stop_at":
            log(f"{name}: stopped at step {result['steps_done']} (--stop-at); rerun with "
                "--resume to continue")
            return seeds.STOPPED
        interrupt.stop_if_requested(args, f"at step {result['steps_done']} of {name}",
                                    resume=True)
    if is_main_process():
        write_report(out, args, data, device, names=list(VARIANTS), args_record=args_record(args),
                     decay_every=base_decay_every(args))
    return 0


def train_variant(variant: Variant, args, data: Data, device, record_path: Path) -> dict:
    """Train one variant from the seed (the same initial weights and dropout stream for every
    variant) and write its ``history.json``."""
    spec = variant_spec(variant, args, device)
    seed_everything(args.seed)
    model = build_model(variant, data, args.width)
    if world_size() > 1:
        model = synchronized(model)
    result = train(model, data.train, data.test, spec, device)
    if is_main_process():
        record_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(record_path, dict(variant=asdict(variant), spec=_spec_record(spec),
                                     args=args_record(args), **result))
    return result


def _finished(path: Path, args) -> bool:
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    return bool(record.get("complete")) and record["args"] == args_record(args)


def args_record(args) -> dict:
    """The arguments a variant's record keeps (a finished variant with the same ones is
    skipped by ``--resume``)."""
    keep = ("dataset", "steps", "batch_size", "base_lr", "base_weight_decay", "momentum",
            "decay_every", "width", "train_subset", "test_subset", "image_size", "seed")
    return {k: getattr(args, k) for k in keep}


def _spec_record(spec: TrainSpec) -> dict:
    keep = ("steps", "batch_size", "lr", "momentum", "weight_decay", "decay_every",
            "decay_factor", "eval_every", "amp", "channels_last")
    return {k: getattr(spec, k) for k in keep}


# names that moved to the shared modules (older code imports them from here)
__getattr__ = moved_names(__name__, {
    **{name: f"batchnorm.repro.image_data.{name}"
       for name in ("DATASETS", "IndexBatches", "load_data")},
    "evaluate": "batchnorm.repro.trainer.evaluate",
    "analyse": "batchnorm.repro.inception_report.analyse",
    "at_chance": "batchnorm.repro.report.at_chance",
    "steps_to_reach": "batchnorm.repro.common.steps_to_reach",
})
