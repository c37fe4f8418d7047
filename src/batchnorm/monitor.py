r"""Percentiles of chosen units' inputs or outputs over training, for any torch model.

The paper's Figure 1(b, c) follows "the input to a typical sigmoid" through training as its
15th, 50th and 85th percentiles. :class:`ActivationMonitor` records exactly that for any
modules and units::

    monitor = ActivationMonitor(model, ["sigmoid3"], units=[7])   # input of model.sigmoid3
    for step in range(steps):
        ...
        if step % 100 == 0:
            with monitor.record(step):
                model(probe_batch)
    monitor.rows()     # [{"step", "module", "unit", "p15", "p50", "p85"}, ...]

Cost: outside ``record`` nothing is attached to the model (hooks exist only inside the
``with`` block), so leaving a monitor on costs nothing on the other steps. Inside it, each
forward call of a watched module copies the watched units' values; at the end of the block the
percentiles over everything seen in the block (all forward calls) are computed at once.

Unit ``u`` of a module is feature/channel ``u`` of dimension 1 of the watched tensor; the
percentile is taken over all its other positions (examples, and spatial positions for
convolutional maps). Percentile :math:`q` of :math:`n` sorted values :math:`v_0 \le \dots \le
v_{n-1}` is linearly interpolated at position :math:`h = (n-1)\,q/100`:
:math:`v_{\lfloor h \rfloor} + (h - \lfloor h \rfloor)(v_{\lceil h \rceil} - v_{\lfloor h
\rfloor})` (NumPy's default, ``method="linear"``).
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

DEFAULT_PERCENTILES = (15.0, 50.0, 85.0)


def compute_percentiles(values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Percentiles ``qs`` (in [0, 100]) along dimension 0 of ``values`` ``(n, k)``; returns
    ``(len(qs), k)`` float64 (linear interpolation, as NumPy's default). Only the needed order
    statistics are selected (``np.partition``, linear time), which is several times faster
    than sorting and has no input size limit (unlike ``torch.quantile``)."""
    if values.dim() != 2 or values.shape[0] == 0:
        raise ValueError(f"compute_percentiles: values must be (n, k) with n >= 1, got "
                         f"shape {tuple(values.shape)}")
    q = np.asarray(list(qs), dtype=np.float64)
    if q.size == 0 or bool(((q < 0) | (q > 100)).any()):
        raise ValueError(f"compute_percentiles: qs must be a non-empty list of numbers in "
                         f"[0, 100], got {list(qs)}")
    position = q * (values.shape[0] - 1) / 100
    low = np.floor(position).astype(np.int64)
    high = np.ceil(position).astype(np.int64)
    # units along the contiguous axis: selection then runs over contiguous memory
    rows = values.detach().cpu().T.contiguous().numpy()
    selected = np.partition(rows, np.unique(np.concatenate([low, high])), axis=1)
    below = selected[:, low].T.astype(np.float64)
    above = selected[:, high].T.astype(np.float64)
    return torch.from_numpy(below + (position - low)[:, None] * (above - below))


class ActivationMonitor:
    """Record percentiles of chosen units of chosen modules' inputs (or outputs).

    Args:
        model: the model; modules are looked up by name in it (``model.get_submodule``).
        modules: names of the modules to watch (e.g. ``["sigmoid3"]`` or ``["3"]`` in a
            ``Sequential``).
        units: indices along dimension 1 to watch, the same for every module; ``None`` (the
            default) watches all units.
        percentiles: which percentiles to record (default 15th, 50th, 85th).
        watch: ``"input"`` (the module's first positional input) or ``"output"``.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str], *,
                 units: Sequence[int] | None = None,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, watch: str = "input"):
        if isinstance(modules, str):
            modules = [modules]
        if not modules:
            raise ValueError("ActivationMonitor: modules must name at least one module")
        if watch not in ("input", "output"):
            raise ValueError(f"ActivationMonitor: watch must be 'input' or 'output', got "
                             f"{watch!r}")
        self.modules: dict[str, nn.Module] = {}
        for name in modules:
            try:
                self.modules[name] = model.get_submodule(name)
            except AttributeError:
                known = [n for n, _ in model.named_modules() if n]
                raise ValueError(f"ActivationMonitor: model has no module {name!r}; its "
                                 f"modules are {known}") from None
        self.units = None if units is None else [int(u) for u in units]
        self.percentiles = tuple(float(q) for q in percentiles)
        compute_percentiles(torch.zeros(1, 1), self.percentiles)  # validate them now
        self.watch = watch
        self.steps: list[int] = []
        # module name -> one (len(percentiles), n_units) float64 tensor per recorded step
        self.history: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self.unit_ids: dict[str, list[int]] = {}

    def _watched_units(self, name: str, tensor) -> torch.Tensor:
        """The watched units of ``tensor`` (the input or output of module ``name``) as a CPU
        copy ``(samples, units)``: every position of a unit is one sample."""
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            raise ValueError(f"ActivationMonitor: {self.watch} of {name!r} must be a "
                             f"tensor with a unit dimension 1, got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        # (N, C, *) -> (N * prod(*), C)
        flat = tensor.detach().movedim(1, -1).reshape(-1, tensor.shape[1])
        if self.units is not None:
            if max(self.units) >= flat.shape[1] or min(self.units) < -flat.shape[1]:
                raise ValueError(f"ActivationMonitor: units {self.units} out of range "
                                 f"for {name!r} with {flat.shape[1]} units")
            flat = flat[:, self.units]
        return flat.to("cpu", copy=True)

    def _attach(self, seen: dict[str, list[torch.Tensor]], handles: list) -> None:
        """Hooks that append each watched module's values to ``seen[name]``; their handles go
        to ``handles`` as they are made."""
        for name, module in self.modules.items():
            if self.watch == "input":
                hook = functools.partial(self._take_input, seen, name)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = functools.partial(self._take_output, seen, name)
                handles.append(module.register_forward_hook(hook))

    def _take_input(self, seen, name, module, args) -> None:
        seen[name].append(self._watched_units(name, args[0] if args else None))

    def _take_output(self, seen, name, module, args, output) -> None:
        seen[name].append(self._watched_units(name, output))

    def _store(self, step: int, seen: dict[str, list[torch.Tensor]]) -> None:
        """The percentiles of everything in ``seen``, recorded under ``step``."""
        missing = [name for name, chunks in seen.items() if not chunks]
        if missing:
            raise RuntimeError(f"ActivationMonitor: step {step}: modules {missing} were not "
                               "called inside record(); nothing to record")
        for name, chunks in seen.items():
            values = torch.cat(chunks)
            self.unit_ids.setdefault(name, self.units if self.units is not None
                                     else list(range(values.shape[1])))
            self.history[name].append(compute_percentiles(values, self.percentiles))
        self.steps.append(int(step))

    @contextmanager
    def record(self, step: int) -> Iterator[ActivationMonitor]:
        """Within this block, collect the watched values of every forward call; at its end,
        store their percentiles under ``step``."""
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        handles = []
        try:
            self._attach(seen, handles)
            yield self
        finally:
            for handle in handles:
                handle.remove()
        self._store(step, seen)

    def series(self, module: str, unit: int | None = None) -> np.ndarray:
        """Recorded percentiles of ``module`` as an array ``(steps, percentiles, units)``, or
        ``(steps, percentiles)`` for one ``unit`` (a unit index of the model, not a position
        in ``units``)."""
        if module not in self.history:
            raise KeyError(f"ActivationMonitor: {module!r} is not watched; watched: "
                           f"{list(self.history)}")
        if not self.history[module]:
            return np.zeros((0, len(self.percentiles), len(self.units or [])))
        array = torch.stack(self.history[module]).numpy()
        if unit is None:
            return array
        ids = self.unit_ids[module]
        if unit not in ids:
            raise KeyError(f"ActivationMonitor: unit {unit} of {module!r} is not watched")
        return array[:, :, ids.index(unit)]

    def column_names(self) -> list[str]:
        """``p15``, ``p50``, ... (``p12.5`` for fractional percentiles)."""
        return [f"p{q:g}" for q in self.percentiles]

    def rows(self) -> list[dict]:
        """The whole record as a table: one row per (step, module, unit)."""
        names = self.column_names()
        table = []
        for module in self.history:
            array = self.series(module)
            for i, step in enumerate(self.steps):
                for j, unit in enumerate(self.unit_ids.get(module, [])):
                    row = dict(step=step, module=module, unit=unit)
                    row.update(zip(names, array[i, :, j].tolist(), strict=True))
                    table.append(row)
        return table

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`rows` as CSV."""
        fields = ["step", "module", "unit", *self.column_names()]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows())
