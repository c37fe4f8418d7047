"""Image classification data for the experiments: which data set (by name), subsets,
standardization, and the order of the mini-batches.

:func:`load_data` returns a :class:`Data` whose splits are in-memory ``(images, labels)``
tensors (Fashion-MNIST, MNIST, CIFAR-10, the ``synthetic`` test set) or, for
``imagefolder:PATH``, streaming :class:`~batchnorm.data.imagefolder.ImageFolder` data sets
(random crops and flips for training, the centre crop for testing: the only augmentation).
:class:`IndexBatches` fixes which examples every training step sees, as a function of the step
alone (:class:`ClassBatches`: the same for non-i.i.d. batches of a few classes each), so that a
resumed run sees the same batches as an uninterrupted one; :func:`image_batches` turns those
indices into tensors on the device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from batchnorm.repro.common import ArgumentError, is_main_process, shard
from batchnorm.repro.interrupt import ignore_interrupts


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
        return num_examples(self.train), num_examples(self.test)


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
            raise ArgumentError("--train-subset, --test-subset and flat (MLP) inputs need an "
                                f"in-memory data set; {name!r} streams its images")
        return Data(name, train, test, len(train.classes), 3, image_size)
    elif name == "synthetic":
        data = _synthetic(seed)
    else:
        raise ArgumentError(f"--dataset must be one of {list(DATASETS)}, got {name!r}")
    x_train, y_train = _subset(data.train, train_subset, seed)
    x_test, y_test = _subset(data.test, test_subset, seed + 1)
    x_train, mean, std = _standardize(x_train)
    x_test, _, _ = _standardize(x_test, mean, std)
    if flatten:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    data.train, data.test = (x_train, y_train.long()), (x_test, y_test.long())
    return data


def load_for(args, **kwargs) -> Data | None:
    """:func:`load_data` for a command's arguments; ``None`` (after printing why) when the
    files are missing."""
    from batchnorm.data.download import MissingDataError

    try:
        return load_data(args.dataset, args.data_dir, train_subset=args.train_subset,
                         test_subset=args.test_subset, seed=args.seed, download=args.download,
                         **kwargs)
    except (MissingDataError, FileNotFoundError) as error:  # FileNotFoundError: image folders
        if is_main_process():
            print(f"batchnorm: {error}", file=sys.stderr)
        return None


def num_examples(data) -> int:
    """The size of a split: an ``(images, labels)`` pair or a ``Dataset``."""
    return len(data[1]) if isinstance(data, tuple) else len(data)


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


# --------------------------------------------------------------------------------------------
# batches


class IndexBatches:
    """Global mini-batches of indices from step ``start`` on, forever: epoch ``e`` visits the
    data in a permutation seeded by ``(seed, e)``, so the batch of any step is a function of
    the step alone (which is what makes ``--resume`` exact). Each process keeps its
    :func:`~batchnorm.repro.common.shard`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if batch_size > n:
            raise ArgumentError(f"--batch-size {batch_size} is larger than the training set "
                                f"({n} examples)")
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


class ClassBatches:
    """Non-i.i.d. mini-batches of indices from step ``start`` on, forever: every batch of
    ``batch_size`` examples comes from ``classes_per_batch`` classes only (Ioffe 2017, section
    4.3: a batch of 32 made of 16 labels x 2 examples). At step ``t`` a generator seeded by
    ``(seed, t)`` picks the classes, splits the batch among them as evenly as possible (the
    first classes get one more where it does not divide), draws that many distinct examples of
    each and shuffles the batch (so that a virtual batch of Ghost BN is not one class). The
    batch of a step is a function of the step alone (``--resume``); each process keeps its
    :func:`~batchnorm.repro.common.shard`."""

    def __init__(self, labels: torch.Tensor, batch_size: int, classes_per_batch: int, seed: int,
                 start: int = 0):
        labels = torch.as_tensor(labels)
        classes = torch.unique(labels)
        if not 1 <= classes_per_batch <= len(classes):
            raise ArgumentError(f"--classes-per-batch must be between 1 and the number of "
                                f"classes ({len(classes)}), got {classes_per_batch}")
        if batch_size < classes_per_batch:
            raise ArgumentError(f"a non-i.i.d. batch of {batch_size} cannot hold "
                                f"{classes_per_batch} classes: use a batch size >= "
                                "--classes-per-batch")
        self.members = [torch.nonzero(labels == c).flatten() for c in classes]
        most = -(-batch_size // classes_per_batch)
        if min(len(m) for m in self.members) < most:
            raise ArgumentError(f"some class has fewer than {most} training examples, too few "
                                f"for a batch of {batch_size} from {classes_per_batch} classes: "
                                "use a larger --train-subset")
        self.batch_size, self.k, self.seed, self.start = batch_size, classes_per_batch, seed, start

    def __iter__(self):
        step = self.start
        q, extra = divmod(self.batch_size, self.k)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 500_009 + step)
            chosen = torch.randperm(len(self.members), generator=generator)[: self.k].tolist()
            parts = []
            for j, c in enumerate(chosen):
                pool = self.members[c]
                take = torch.randperm(len(pool), generator=generator)[: q + (j < extra)]
                parts.append(pool[take])
            batch = torch.cat(parts)
            batch = batch[torch.randperm(len(batch), generator=generator)]
            yield shard(batch).tolist()
            step += 1


def image_batches(data, index_batches, device, channels_last: bool = False, workers: int = 0):
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
                                             generator=torch.Generator().manual_seed(0),
                                             worker_init_fn=ignore_interrupts)
    for x, y in stream:
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y.to(device, non_blocking=True)
