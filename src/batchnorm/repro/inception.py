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

The step loop :func:`train` (checkpoints, resume, evaluation, divergence detection, bfloat16
autocast and channels_last on CUDA, DDP under ``torchrun``) is shared with the lr-sweep and
depth experiments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from batchnorm.repro.common import (
    add_data_arguments,
    flush_denormals,
    init_distributed,
    is_main_process,
    log,
    pick_device,
    prepare_out_dir,
    seed_everything,
    shard,
    steps_to_reach,
    world_size,
    write_csv,
    write_json,
)

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
# data


@dataclass
class Data:
    """A classification data set: ``train``/``test`` are ``(images, labels)`` tensors (images
    float32 ``(N, C, H, W)``, normalized) or :class:`torch.utils.data.Dataset` s of pairs."""

    name: str
    train: object
    test: object
    num_classes: int
    in_channels: int
    image_size: int
    note: str = ""

    def sizes(self) -> tuple[int, int]:
        return _length(self.train), _length(self.test)


DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagefolder:PATH")


def load_data(name: str, data_dir: str | None = None, *, train_subset: int = 0,
              test_subset: int = 0, seed: int = 0, image_size: int = 224,
              flatten: bool = False, download: bool = True) -> Data:
    """Load ``fashion-mnist``, ``mnist``, ``cifar10`` or ``imagefolder:PATH`` (``PATH/train``,
    ``PATH/val``). ``train_subset``/``test_subset`` > 0 keep that many examples, drawn with
    ``seed`` (tensor data sets only). ``flatten`` reshapes images to vectors (for MLPs).
    ``download=False`` never touches the network (missing files raise ``MissingDataError``).

    ``synthetic`` (not listed in the help) is a tiny learnable data set for tests: 4 classes of
    noisy 1x16x16 prototypes.
    """
    if name in ("fashion-mnist", "mnist"):
        from batchnorm.data.mnist import load_idx_dataset

        train = load_idx_dataset(name, "train", data_dir, download=download)
        test = load_idx_dataset(name, "test", data_dir, download=download)
        data = Data(name, train, test, 10, 1, 28)
    elif name == "cifar10":
        from batchnorm.data.cifar import load_cifar10

        train = load_cifar10("train", data_dir, download=download)
        test = load_cifar10("test", data_dir, download=download)
        data = Data(name, train, test, 10, 3, 32)
    elif name.startswith("imagefolder:"):
        from batchnorm.data.imagefolder import ImageFolder

        root = Path(name.split(":", 1)[1])
        train = ImageFolder(root / "train", image_size=image_size, train=True)
        test = ImageFolder(root / "val", image_size=image_size, train=False,
                           classes=train.classes)
        if train_subset or test_subset or flatten:
            raise ValueError("load_data: train_subset, test_subset and flatten need an in-memory "
                             f"data set; {name!r} streams its images")
        return Data(name, train, test, len(train.classes), 3, image_size)
    elif name == "synthetic":
        data = _synthetic(seed)
    else:
        raise ValueError(f"load_data: dataset must be one of {list(DATASETS)}, got {name!r}")
    x_train, y_train = _subset(data.train, train_subset, seed)
    x_test, y_test = _subset(data.test, test_subset, seed + 1)
    x_train, mean, std = _standardize(x_train)
    x_test, _, _ = _standardize(x_test, mean, std)
    if flatten:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    data.train, data.test = (x_train, y_train.long()), (x_test, y_test.long())
    return data


def _subset(pair, n: int, seed: int):
    images, labels = pair
    if n <= 0 or n >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[keep], labels[keep]


def _standardize(images: torch.Tensor, mean=None, std=None):
    """uint8 (scaled to [0, 1]) or float images -> float32 ``(N, C, H, W)`` standardized per
    channel with ``mean``/``std``, which are computed from ``images`` when not given."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if mean is None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return (x - mean) / std, mean, std


def _synthetic(seed: int) -> Data:
    gen = torch.Generator().manual_seed(10_000 + seed)
    prototypes = torch.randn(4, 1, 16, 16, generator=gen)

    def draw(n):
        labels = torch.randint(4, (n,), generator=gen)
        return prototypes[labels] + torch.randn(n, 1, 16, 16, generator=gen), labels

    return Data("synthetic", draw(512), draw(256), 4, 1, 16, note="synthetic test data")


def _length(data) -> int:
    return len(data[1]) if isinstance(data, tuple) else len(data)


class IndexBatches:
    """Global mini-batches of indices from step ``start`` on, forever: epoch ``e`` visits the
    data in a permutation seeded by ``(seed, e)``, so the batch of any step is a function of
    the step alone (which is what makes ``--resume`` exact). Each process keeps its
    :func:`~batchnorm.repro.common.shard`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) is larger than the training set ({n})")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        per_epoch = self.n // self.batch_size  # the last partial batch of an epoch is dropped
        epoch, order = None, None
        step = self.start
        while True:
            e, i = divmod(step, per_epoch)
            if e != epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                epoch, order = e, torch.randperm(self.n, generator=generator)
            yield shard(order[i * self.batch_size : (i + 1) * self.batch_size]).tolist()
            step += 1


def _batches(data, index_batches, device, channels_last: bool, workers: int = 0):
    """(x, y) on ``device`` for each index list of ``index_batches``."""
    if isinstance(data, tuple):
        images, labels = data
        stream = ((images[i], labels[i]) for i in index_batches)
    else:
        # An explicit generator: the loader must not draw from the global RNG, whose state a
        # checkpoint restores (dropout masks).
        stream = torch.utils.data.DataLoader(data, batch_sampler=index_batches,
                                             num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
    for x, y in stream:
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# the shared training loop


@dataclass
class TrainSpec:
    """Everything :func:`train` needs besides the model and data.

    The learning rate at step ``t`` (0-based) is ``lr * decay_factor ** (t // decay_every)``
    (constant if ``decay_every == 0``). Weight decay applies to weights of rank >= 2
    (convolutions, linear layers), not to biases or BN's gamma/beta.
    """

    steps: int
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_every: int = 0
    decay_factor: float = 0.96
    eval_every: int = 100
    check_every: int = 10  # divergence check (and the loss shown) every this many steps
    eval_batch_size: int = 500
    seed: int = 0
    checkpoint: str | None = None  # file; written every ckpt_every steps and when stopping
    ckpt_every: int = 0
    resume: bool = False
    amp: bool = False  # bfloat16 autocast (CUDA)
    channels_last: bool = False
    workers: int = 0
    progress: bool = True
    label: str = "train"
    stop_at: int = 0  # pretend to be killed after this step (tests of --resume)
    meta: dict = field(default_factory=dict)  # stored in the checkpoint, must match on resume

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "check_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainSpec: {name} must be a positive int, got {value!r}")
        for name in ("decay_every", "ckpt_every", "stop_at", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainSpec: {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainSpec: lr must be > 0, got {self.lr!r}")

    def lr_at(self, step: int) -> float:
        if not self.decay_every:
            return self.lr
        return self.lr * self.decay_factor ** (step // self.decay_every)

    def fingerprint(self) -> dict:
        """What must be equal for a checkpoint to be resumed (``steps`` may grow)."""
        keep = ("batch_size", "lr", "momentum", "weight_decay", "decay_every", "decay_factor",
                "seed")
        return {k: getattr(self, k) for k in keep} | {"meta": self.meta}


def train(model: nn.Module, train_data, test_data, spec: TrainSpec,
          device: torch.device | str = "cpu") -> dict:
    """Train ``model`` with SGD + momentum on cross-entropy for ``spec.steps`` steps.

    Evaluates top-1 accuracy on ``test_data`` (model in eval mode: BN uses its moving averages)
    at step 0, every ``eval_every`` steps and at the end. Every ``check_every`` steps the
    training loss and all parameters are checked: a non-finite value means divergence, which
    is recorded and ends the run. Under ``torchrun`` (several processes) the model is wrapped in
    DDP, each process trains on its shard of every global batch and evaluation is sharded.

    Returns ``{"history": [{step, lr, train_loss, test_accuracy, seconds}], "diverged": None |
    {...}, "steps_done", "complete", "interrupted", "seconds"}``. With ``spec.resume`` and an
    existing checkpoint, training continues from it and gives the same result as an
    uninterrupted run (data order, dropout masks and optimizer state are all restored).
    """
    device = torch.device(device)
    if device.type != "cpu":
        return _train(model, train_data, test_data, spec, device)
    with flush_denormals():
        return _train(model, train_data, test_data, spec, device)


def _train(model: nn.Module, train_data, test_data, spec: TrainSpec,
           device: torch.device) -> dict:
    model.to(device)
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, momentum=spec.momentum,
    )
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    state = dict(step=0, history=[], diverged=None, seconds=0.0,
                 loss_sum=torch.zeros((), dtype=acc_dtype, device=device), loss_count=0)
    ckpt = Path(spec.checkpoint) if spec.checkpoint else None
    if spec.resume and ckpt is not None and ckpt.exists():
        _load_checkpoint(ckpt, model, optimizer, state, spec, device)
        _say(f"{spec.label}: resumed from {ckpt} at step {state['step']}")
    elif spec.resume:
        _say(f"{spec.label}: no checkpoint to resume from, starting at step 0")
    net = model
    if world_size() > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate_and_record(step: int) -> None:
        accuracy = evaluate(model, test_data, device, spec)
        count = state["loss_count"]
        loss_sum = state["loss_sum"].clone()
        if world_size() > 1:  # every process's shards: the loss on the global batches
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size()
        train_loss = float(loss_sum) / count if count else None
        state["history"].append(dict(step=step, lr=spec.lr_at(max(step - 1, 0)),
                                     train_loss=train_loss, test_accuracy=accuracy,
                                     seconds=round(state["seconds"] + time.perf_counter()
                                                   - started, 2)))
        state["loss_sum"].zero_()
        state["loss_count"] = 0
        loss_text = "-" if train_loss is None else f"{train_loss:.4f}"
        _say(f"{spec.label}: step {step}/{spec.steps}  lr {spec.lr_at(max(step - 1, 0)):.4g}  "
             f"train loss {loss_text}  test accuracy {accuracy:.4f}", bar)

    started = time.perf_counter()
    bar = tqdm(total=spec.steps, initial=state["step"], desc=spec.label, dynamic_ncols=True,
               disable=not (spec.progress and is_main_process()), leave=False)
    if not state["history"]:
        evaluate_and_record(0)
    index_batches = IndexBatches(_length(train_data), spec.batch_size, spec.seed, state["step"])
    batches = _batches(train_data, index_batches, device, spec.channels_last, spec.workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp)
    interrupted = False
    model.train()
    while state["step"] < spec.steps and state["diverged"] is None:
        step = state["step"]
        lr = spec.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        with autocast:
            loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["loss_sum"] += loss.detach()  # no sync: read only at checks
        state["loss_count"] += 1
        state["step"] = step = step + 1
        bar.update(1)
        boundary = step % spec.eval_every == 0 or step == spec.steps
        if boundary or step % spec.check_every == 0 or step == spec.stop_at:
            state["diverged"] = _check_divergence(model, state["loss_sum"], step)
            if state["diverged"] is not None:
                _say(f"{spec.label}: DIVERGED at step {step}: {state['diverged']['reason']}",
                     bar)
                break
            bar.set_postfix(loss=f"{float(state['loss_sum']) / state['loss_count']:.4f}",
                            refresh=False)
        if boundary:
            evaluate_and_record(step)
        if spec.ckpt_every and step % spec.ckpt_every == 0 or step == spec.stop_at:
            state["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            if ckpt is not None:
                _save_checkpoint(ckpt, model, optimizer, state, spec)
            if step == spec.stop_at:
                interrupted = True
                break
    bar.close()
    state["seconds"] += time.perf_counter() - started
    if ckpt is not None and not interrupted:
        _save_checkpoint(ckpt, model, optimizer, state, spec)
    return dict(history=state["history"], diverged=state["diverged"], steps_done=state["step"],
                complete=state["step"] >= spec.steps or state["diverged"] is not None,
                interrupted=interrupted, seconds=round(state["seconds"], 2))


def evaluate(model: nn.Module, data, device: torch.device, spec: TrainSpec) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``data``; sharded over the processes."""
    was_training = model.training
    model.eval()
    n = _length(data)
    order = torch.arange(n)
    index_batches = [shard(order[i : i + spec.eval_batch_size]).tolist()
                     for i in range(0, n, spec.eval_batch_size)]
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp):
        for x, y in _batches(data, index_batches, device, spec.channels_last, spec.workers):
            counts[0] += (model(x).argmax(1) == y).sum()
            counts[1] += len(y)
    if world_size() > 1:
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1])


def _check_divergence(model: nn.Module, loss_sum: torch.Tensor, step: int):
    """None while the loss (summed since the last evaluation) and every parameter are finite;
    else a record of what blew up."""
    params = [p.detach() for p in model.parameters()]
    finite = torch.stack([torch.isfinite(loss_sum)] + [torch.isfinite(p).all() for p in params])
    ok = finite.all().float()
    if world_size() > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if bool(ok):
        return None
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in params)
    infinite = sum(int(torch.isinf(p).sum()) for p in params)
    total = sum(p.numel() for p in params)
    loss = float(loss_sum)
    reason = f"non-finite training loss ({loss})" if not math.isfinite(loss) else (
        "non-finite parameters")
    return dict(step=step, reason=reason, nonfinite_parameters=nonfinite,
                infinite_parameters=infinite, total_parameters=total)


def _save_checkpoint(path: Path, model, optimizer, state, spec: TrainSpec) -> None:
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                   state=state, fingerprint=spec.fingerprint(), rng=torch.get_rng_state(),
                   cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model, optimizer, state, spec: TrainSpec, device) -> None:
    payload = torch.load(path, map_location=device, weights_only=False)
    if payload["fingerprint"] != spec.fingerprint():
        raise ValueError(
            f"--resume: checkpoint {path} was written by a different configuration:\n"
            f"  checkpoint: {payload['fingerprint']}\n  this run:   {spec.fingerprint()}\n"
            "use another --out (or --ckpt-dir) or delete the checkpoint")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    state.update(payload["state"])
    state["loss_sum"] = state["loss_sum"].to(device)
    torch.set_rng_state(payload["rng"])
    if payload["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])


def _say(message: str, bar=None) -> None:
    if bar is not None and not bar.disable:
        bar.write(f"[{time.strftime('%H:%M:%S')}] {message}")
    else:
        log(message)


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
                        help="continue from the checkpoints (and skip finished variants)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bfloat16 autocast on CUDA, float32 on the CPU")
    parser.add_argument("--workers", type=int, default=4,
                        help="data-loading processes (imagefolder only)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/inception")
    parser.add_argument("--note", default="", help="a paragraph put at the top of summary.md")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--stop-at", type=int, default=0, help=argparse.SUPPRESS)


def load_for(args, **kwargs) -> Data | None:
    """:func:`load_data` for a command's arguments; ``None`` (after printing why) when the
    files are missing."""
    from batchnorm.data.download import MissingDataError

    try:
        return load_data(args.dataset, args.data_dir, train_subset=args.train_subset,
                         test_subset=args.test_subset, seed=args.seed, download=args.download,
                         **kwargs)
    except MissingDataError as error:
        if is_main_process():
            print(f"batchnorm: {error}", file=sys.stderr)
        return None


def build_model(variant: Variant, data: Data, width: float = 1.0) -> nn.Module:
    """The variant's network for ``data``: the ImageNet stem for images of 96 pixels or more,
    else the small-image stem (see :mod:`batchnorm.models.inception`)."""
    from batchnorm.models.inception import InceptionBN

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
    distributed = init_distributed()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_for(args, image_size=args.image_size)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    names = list(VARIANTS) if args.all else [args.variant]
    n_train, n_test = data.sizes()
    log(f"inception: {data.name} ({n_train} train / {n_test} test, {data.num_classes} classes), "
        f"variants {', '.join(names)}, {args.steps} steps of {args.batch_size} on {device}"
        + (f" x {world_size()} processes" if distributed else ""))
    for name in names:
        variant = VARIANTS[name]
        record_path = out / name / "history.json"
        if args.resume and _finished(record_path, args):
            log(f"{name}: already finished ({record_path}), skipping")
            continue
        spec = variant_spec(variant, args, device)
        seed_everything(args.seed)  # same initial weights and dropout stream per variant
        model = build_model(variant, data, args.width)
        if distributed:
            model = _synchronized(model)
        result = train(model, data.train, data.test, spec, device)
        if is_main_process():
            record_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(record_path, dict(variant=asdict(variant), spec=_spec_record(spec),
                                         args=_args_record(args), **result))
        if result["interrupted"]:
            log(f"{name}: stopped at step {result['steps_done']} (--stop-at); rerun with "
                "--resume to continue")
            return 0
    if is_main_process():
        write_report(out, args, data, device)
    return 0


def _synchronized(model: nn.Module) -> nn.Module:
    """BN layers -> synchronized BN (statistics over the global batch), keeping the fused
    activations: a conversion that dropped them would silently remove every nonlinearity."""
    import batchnorm

    before = [getattr(m, "activation", None) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model = batchnorm.convert(model, sync=True)
    after = [getattr(m, "activation", None) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if before != after:
        raise RuntimeError("batchnorm.convert(sync=True) did not keep the BN layers' fused "
                           "activations; the synchronized network would be linear")
    return model


def _finished(path: Path, args) -> bool:
    if not path.exists():
        return False
    import json

    record = json.loads(path.read_text())
    return bool(record.get("complete")) and record["args"] == _args_record(args)


def _args_record(args) -> dict:
    keep = ("dataset", "steps", "batch_size", "base_lr", "base_weight_decay", "momentum",
            "decay_every", "width", "train_subset", "test_subset", "image_size", "seed")
    return {k: getattr(args, k) for k in keep}


def _spec_record(spec: TrainSpec) -> dict:
    keep = ("steps", "batch_size", "lr", "momentum", "weight_decay", "decay_every",
            "decay_factor", "eval_every", "amp", "channels_last")
    return {k: getattr(spec, k) for k in keep}


# --------------------------------------------------------------------------------------------
# the report: Figure 2 analogue, Figure 3 analogue table, summary


def at_chance(accuracy: float, num_classes: int, test_size: int) -> bool:
    """Whether ``accuracy`` is within 2 standard errors of guessing (``1/num_classes``) on a
    test set of ``test_size`` examples."""
    chance = 1.0 / num_classes
    return accuracy <= chance + 2 * math.sqrt(chance * (1 - chance) / test_size)


def analyse(records: dict[str, dict], num_classes: int, test_size: int) -> dict:
    """Per variant: max accuracy (and its step), steps to reach plain Inception's max, speed-up
    over Inception, divergence, and whether it stayed at chance level."""
    chance = 1.0 / num_classes
    target = None
    if "inception" in records and records["inception"]["history"]:
        target = max(p["test_accuracy"] for p in records["inception"]["history"])
    base_steps = None
    rows = {}
    for name, record in records.items():
        history = record["history"]
        best = max(history, key=lambda p: p["test_accuracy"])
        reach = steps_to_reach(history, target) if target is not None else None
        if name == "inception":
            base_steps = reach
        rows[name] = dict(
            max_accuracy=best["test_accuracy"], max_accuracy_step=best["step"],
            final_accuracy=history[-1]["test_accuracy"], steps_to_inception_max=reach,
            diverged=record["diverged"], steps_done=record["steps_done"],
            # the paper's "stayed at chance": no evaluation after the start was better
            at_chance=all(at_chance(p["test_accuracy"], num_classes, test_size)
                          for p in history[1:]),
            final_at_chance=at_chance(history[-1]["test_accuracy"], num_classes, test_size),
            lr=record["spec"]["lr"],
        )
    for row in rows.values():
        reach = row["steps_to_inception_max"]
        row["speedup_vs_inception"] = (base_steps / reach if base_steps and reach else None)
    return dict(inception_max_accuracy=target, chance=chance, variants=rows)


def write_report(out: Path, args, data: Data, device) -> None:
    import json

    records = {}
    for name in VARIANTS:
        path = out / name / "history.json"
        if path.exists():
            records[name] = json.loads(path.read_text())
    if not records:
        return
    n_train, n_test = data.sizes()
    analysis = analyse(records, data.num_classes, n_test)
    write_json(out / "results.json", dict(
        experiment="inception", dataset=data.name, train_examples=n_train, test_examples=n_test,
        device=str(device), threads=torch.get_num_threads(), world_size=world_size(),
        args=_args_record(args),
        command=" ".join(["batchnorm"] + sys.argv[1:]) if sys.argv else "",
        analysis=analysis,
        variants={k: dict(spec=v["spec"], diverged=v["diverged"], steps_done=v["steps_done"],
                          seconds=v["seconds"], history=v["history"]) for k, v in records.items()},
    ))
    write_csv(out / "metrics.csv", [dict(variant=k, **p) for k, v in records.items()
                                    for p in v["history"]])
    _figure2(out / "figure2.png", records, analysis, data)
    (out / "summary.md").write_text(_summary(records, analysis, args, data, device))
    log(f"inception: wrote {out / 'summary.md'}, figure2.png, results.json, metrics.csv")


def _figure2(path: Path, records, analysis, data: Data) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, record in records.items():
        steps = [p["step"] for p in record["history"]]
        acc = [p["test_accuracy"] for p in record["history"]]
        style = "--" if not VARIANTS[name].bn else "-"
        (line,) = ax.plot(steps, acc, style, label=name, lw=1.6)
        if record["diverged"]:
            ax.plot([record["diverged"]["step"]], [acc[-1]], "x", color=line.get_color(), ms=10,
                    mew=2)
    if analysis["inception_max_accuracy"] is not None:
        ax.axhline(analysis["inception_max_accuracy"], color="gray", lw=0.8, ls=":",
                   label="Inception's max")
    ax.axhline(analysis["chance"], color="black", lw=0.6, ls=":", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (top-1)")
    ax.set_title(f"Figure 2 analogue: {data.name}, single crop (x = diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_steps(steps) -> str:
    if steps is None:
        return "never"
    return f"{steps:.3g}" if isinstance(steps, float) else str(steps)


def _summary(records, analysis, args, data: Data, device) -> str:
    n_train, n_test = data.sizes()
    rows = analysis["variants"]
    target = analysis["inception_max_accuracy"]
    lines = ["# Inception variants (paper section 4.2, Figures 2 and 3)", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [
        f"Data: **{data.name}**, {n_train} training / {n_test} test examples; "
        f"{args.steps} steps of {args.batch_size} per variant; width x{args.width}; "
        f"device {device}"
        + (f" ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")
        + (f" x {world_size()} processes" if world_size() > 1 else "") + ". "
        f"Base (x1) learning rate {args.base_lr}, momentum {args.momentum}, weight decay "
        f"{args.base_weight_decay} (accelerated: /5), x0.96 learning-rate decay every "
        f"{base_decay_every(args)} steps (accelerated: 6x as often). "
        f"Seed {args.seed}.",
        "",
        "## Figure 3 analogue",
        "",
        f"Target = plain Inception's maximum test accuracy here "
        f"({'n/a' if target is None else f'{target:.4f}'}); the paper's is 72.2% (ImageNet).",
        "",
        "| network | LR (ours) | steps to Inception's max | speed-up | max accuracy (step) "
        "| paper LR | paper steps to 72.2% | paper max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        v = VARIANTS[name]
        if row["diverged"]:
            reach = f"diverged at step {row['diverged']['step']}"
        else:
            reach = _fmt_steps(row["steps_to_inception_max"])
        speed = f"{row['speedup_vs_inception']:.1f}x" if row["speedup_vs_inception"] else "-"
        paper_max = "-" if v.paper_max_accuracy is None else f"{100 * v.paper_max_accuracy:.1f}%"
        paper_steps = _fmt_steps(v.paper_steps) if v.paper_max_accuracy else v.paper_note
        lines.append(
            f"| {name} | {row['lr']:.4g} | {reach} | {speed} | {100 * row['max_accuracy']:.2f}% "
            f"({row['max_accuracy_step']}) | {v.paper_lr} | {paper_steps} | {paper_max} |")
    lines += ["", "## The paper's failure cases and other observations", ""]
    for name, row in rows.items():
        if row["diverged"]:
            d = row["diverged"]
            lines.append(
                f"- **{name} diverged** at step {d['step']}: {d['reason']}; "
                f"{d['nonfinite_parameters']} of {d['total_parameters']} parameters non-finite "
                f"({d['infinite_parameters']} infinite).")
        elif row["at_chance"]:
            lines.append(f"- **{name} stayed at chance level** ({100 * analysis['chance']:.0f}%): "
                         f"max {100 * row['max_accuracy']:.2f}%.")
    for name, expectation in (("inception-x5", "diverges"),
                              ("inception-sigmoid", "stays at chance")):
        row = rows.get(name)
        if row is None or row["diverged"] or (name == "inception-sigmoid" and row["at_chance"]):
            continue
        did = "its loss and parameters stayed finite" if name == "inception-x5" else (
            "it rose above chance")
        end = " (at chance at the end)" if row["final_at_chance"] else ""
        lines.append(f"- {name}: the paper says it {expectation}; here {did}: max accuracy "
                     f"{100 * row['max_accuracy']:.2f}%, final "
                     f"{100 * row['final_accuracy']:.2f}%{end}.")
    order = sorted((n for n in rows if not rows[n]["diverged"]),
                   key=lambda n: -rows[n]["max_accuracy"])
    lines += ["", "Ranking by maximum accuracy here: " + " > ".join(order) + ". The paper's: "
              "bn-x30 > bn-x5 > bn-baseline > inception > bn-x5-sigmoid "
              "(inception-x5 diverged, inception-sigmoid at chance).", "",
              f"Training time: {sum(r['seconds'] for r in records.values()):.0f} s over "
              f"{len(records)} variants ("
              + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in records.items()) + ").", "",
              "Figure 2 analogue: `figure2.png` (test accuracy vs. training step, all variants). "
              "Per-variant curves: `*/history.json`, `metrics.csv`; everything: `results.json`.",
              ""]
    return "\n".join(lines)
