r"""One number per layer for how much its inputs' distribution moved during training.

The BN paper's view of internal covariate shift (Ioffe & Szegedy 2015, section 4.1, Figure
1(b, c)) is the drift of a layer input's distribution over training, shown as its 15th, 50th
and 85th percentiles against the step. :class:`batchnorm.monitor.ActivationMonitor` records
those percentiles; :func:`layer_drift` reduces them to one number per layer.

Definition. For one unit with recorded steps :math:`t_1 < \dots < t_T`, median
:math:`m_t = p_{50}(t)` and spread :math:`s_t = p_{85}(t) - p_{15}(t)` (the monitor's
default percentiles; others can be named), measured in units of the unit's mean spread
:math:`\bar s = \frac1T \sum_t s_t`:

.. math::
    D_{\mathrm{median}} = \frac{V(m)}{\bar s}, \qquad
    D_{\mathrm{spread}} = \frac{V(s)}{\bar s}, \qquad D = D_{\mathrm{median}} +
    D_{\mathrm{spread}}

where :math:`V` is the *range* :math:`\max_t x_t - \min_t x_t` (default: how far the
distribution got from where it ever was) or the *total variation* :math:`\sum_{k=1}^{T-1}
\lvert x_{t_{k+1}} - x_{t_k} \rvert` (``measure="total_variation"``: also counts back-and-forth
movement, and grows with the number of recorded steps, so compare runs recorded at the same
steps). Normalizing by the typical spread makes the number scale-free: a median that moves by
one typical 15-85 width gives :math:`D_{\mathrm{median}} = 1`, whether the unit's values are
of size 0.01 or 100, so networks with and without BN compare directly. A layer's drift is the
mean of :math:`D` (and of each part) over its recorded units. A unit whose spread is always 0
has drift 0 if nothing moved and ``inf`` otherwise. One recorded step gives drift 0.

Cost: none during training beyond the monitor's own recording; this is post-processing of
its rows (linear in their number).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from batchnorm.monitor import ActivationMonitor

MEASURES = ("range", "total_variation")


@dataclass(frozen=True)
class LayerDrift:
    """Drift of one monitored module (means over its units)."""

    module: str
    drift: float         # mean over units of D = D_median + D_spread
    median_drift: float  # mean over units of D_median
    spread_drift: float  # mean over units of D_spread
    units: int
    steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _variation(x: np.ndarray, measure: str) -> float:
    if measure == "range":
        return float(x.max() - x.min())
    return float(np.abs(np.diff(x)).sum())


def _relative(amount: float, scale: float) -> float:
    if scale > 0:
        return amount / scale
    return 0.0 if amount == 0 else math.inf


def unit_drift(median: Iterable[float], low: Iterable[float], high: Iterable[float],
               measure: str = "range") -> tuple[float, float]:
    """``(D_median, D_spread)`` of one unit from its percentile series in step order."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    m = np.asarray(list(median), dtype=np.float64)
    spread = np.asarray(list(high), dtype=np.float64) - np.asarray(list(low), dtype=np.float64)
    if m.size == 0 or m.shape != spread.shape:
        raise ValueError("unit_drift: median, low and high must be equally long and non-empty")
    if not (np.isfinite(m).all() and np.isfinite(spread).all()):
        return math.nan, math.nan
    if (spread < 0).any():
        raise ValueError("unit_drift: the high percentile is below the low one")
    scale = float(spread.mean())
    return (_relative(_variation(m, measure), scale),
            _relative(_variation(spread, measure), scale))


def layer_drift(source: ActivationMonitor | Iterable[dict], *, measure: str = "range",
                median: str = "p50", low: str = "p15", high: str = "p85"
                ) -> dict[str, LayerDrift]:
    """Drift per module from an :class:`~batchnorm.monitor.ActivationMonitor` or its
    :meth:`~batchnorm.monitor.ActivationMonitor.rows` (dicts with ``step``, ``module``,
    ``unit`` and the percentile columns named by ``median``, ``low``, ``high``).

    Returns ``{module: LayerDrift}`` in the order modules first appear.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    rows = source.rows() if isinstance(source, ActivationMonitor) else list(source)
    series: dict[str, dict[object, list[tuple[int, float, float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for row in rows:
        try:
            entry = (int(row["step"]), float(row[median]), float(row[low]), float(row[high]))
            series[row["module"]][row["unit"]].append(entry)
        except KeyError as error:
            raise ValueError(f"layer_drift: row {row} has no column {error}") from None
    result: dict[str, LayerDrift] = {}
    for module, units in series.items():
        parts, steps = [], 0
        for unit, entries in units.items():
            entries.sort(key=lambda e: e[0])
            recorded = [e[0] for e in entries]
            if len(set(recorded)) != len(recorded):
                raise ValueError(f"layer_drift: {module!r} unit {unit} has a step twice")
            _, m, lo, hi = zip(*entries, strict=True)
            parts.append(unit_drift(m, lo, hi, measure))
            steps = max(steps, len(entries))
        d_median = float(np.mean([p[0] for p in parts]))
        d_spread = float(np.mean([p[1] for p in parts]))
        result[module] = LayerDrift(module, d_median + d_spread, d_median, d_spread,
                                    len(parts), steps)
    return result
