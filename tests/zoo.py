"""torchvision and timm model definitions for the tests, on the CPU build of torch.

torchvision's wheels on PyPI are built against the CUDA build of torch; next to the CPU build
their compiled operators (``torchvision::nms``, ``roi_align``, ...) do not load, and
``import torchvision`` then fails while registering fake (meta) kernels for those operators.
The model definitions we test (ResNet, MobileNet, EfficientNet, ...) are pure Python and need
none of them. So :func:`import_torchvision` first tries the normal import and, only if it fails
for that reason, imports again with the meta-registration module replaced by an empty one.
Detection ops stay unusable (they would fail with "operator does not exist"); the models work.
timm imports torchvision, so :func:`import_timm` goes through the same door.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def import_torchvision():
    """``torchvision``, its model definitions usable even without its compiled operators;
    skips the calling test when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (it is in the dev extra)")
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "does not exist" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    return importlib.import_module("torchvision")


def import_timm():
    """``timm`` (after :func:`import_torchvision`); skips the calling test when absent."""
    import_torchvision()
    return pytest.importorskip("timm")
