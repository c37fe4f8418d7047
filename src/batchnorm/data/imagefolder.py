"""Images in class folders (the ImageNet layout): ``root/<class>/<image>``.

For users who have ImageNet (or any such data) on disk; nothing is downloaded. Decoding uses
Pillow (``pip install pillow``; it comes with matplotlib); torchvision is not needed.

Preprocessing (single-crop, as the paper evaluates):
- training: scale the shorter side to ``image_size * 8/7`` (256 for 224), a random
  ``image_size`` square crop, a random horizontal flip;
- evaluation: the same scaling and the centre crop;
then float32 ``(3, image_size, image_size)`` in [0, 1], standardized with ImageNet's
per-channel mean and standard deviation. Randomness comes from torch's generator (seeded per
DataLoader worker by torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageFolder(torch.utils.data.Dataset):
    """``(image, label)`` pairs from ``root/<class>/<file>``; classes are the sorted folder
    names (or ``classes``, to give a validation set the training set's label order)."""

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224, train: bool = True,
                 classes: list[str] | None = None):
        try:
            from PIL import Image  # noqa: F401
        except ImportError as error:
            raise ImportError("ImageFolder needs Pillow to decode images: pip install pillow"
                              ) from error
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a folder (expected "
                                    "root/<class>/<image> files, e.g. ImageNet's train/ or val/)")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"ImageFolder: image_size must be a positive int, got {image_size!r}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"ImageFolder: {self.root} has class folders not in `classes`: "
                             f"{unknown[:5]}")
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, index[name]) for name in found
                        for path in sorted((self.root / name).rglob("*"))
                        if path.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no images ({', '.join(EXTENSIONS)}) in the "
                                    f"class folders of {self.root}")
        self.image_size = image_size
        self.train = train
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as image:
            image = image.convert("RGB")
            short = round(self.image_size * 8 / 7)
            w, h = image.size
            scale = short / min(w, h)
            image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                                 Image.BILINEAR)
            w, h = image.size
            s = self.image_size
            if self.train:
                left = int(torch.randint(w - s + 1, ()))
                top = int(torch.randint(h - s + 1, ()))
            else:
                left, top = (w - s) // 2, (h - s) // 2
            pixels = np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.uint8)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)
        if self.train and bool(torch.rand(()) < 0.5):
            x = x.flip(2)
        return (x - self._mean) / self._std, label
