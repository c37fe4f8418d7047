"""What the experiments' reports share: figures (the matplotlib set-up, colours, the usual
panels) and the wording of numbers in ``summary.md``."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: Path, rows: int = 1, cols: int = 1, *, figsize, dpi: int = 120,
           title: str | None = None, title_size=None):
    """``with figure(path, 1, 2, figsize=...) as (fig, axes):`` draw; on leaving, the figure
    (with ``title`` on top) is laid out, written to ``path`` and closed."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=figsize)
    try:
        yield fig, axes
        if title is not None:
            fig.suptitle(title, fontsize=title_size)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def finish(ax, xlabel: str, ylabel: str | None, title: str, *, legend: dict | None = None,
           **title_options) -> None:
    """Axis labels, title, a light grid and the legend (``legend``: its options)."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title, **title_options)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {}))


def palette(name: str, n: int, span: float = 0.9) -> list:
    """``n`` colours spread over the first ``span`` of the colormap ``name``."""
    return pyplot().get_cmap(name)([i / max(1, n - 1) * span for i in range(n)])


def plot_runs(ax, runs: list[dict], key: str, colormap: str, label) -> None:
    """Test accuracy against step, a line per run: coloured by ``run[key]``, dashed without BN,
    an x where a run diverged; ``label(run)`` names it."""
    values = sorted({r[key] for r in runs})
    colors = palette(colormap, len(values))
    for r in runs:
        color = colors[values.index(r[key])]
        steps = [p["step"] for p in r["history"]]
        acc = [p["test_accuracy"] for p in r["history"]]
        ax.plot(steps, acc, "-" if r["bn"] else "--", color=color, lw=1.4, label=label(r))
        if r["diverged"]:
            ax.plot([steps[-1]], [acc[-1]], "x", color=color, ms=9, mew=2)


def plot_versus(ax, runs: list[dict], key: str, metric: str, chance: float) -> None:
    """``run[metric]`` against ``run[key]``, one line without BN and one with (red x:
    diverged), and the chance level."""
    for bn, style in ((False, "o--"), (True, "s-")):
        sub = sorted((r for r in runs if r["bn"] == bn), key=lambda r: r[key])
        ax.plot([r[key] for r in sub], [r[metric] for r in sub], style,
                label="BN" if bn else "no BN")
        for r in sub:
            if r["diverged"]:
                ax.plot([r[key]], [r[metric]], "x", color="red", ms=11, mew=2)
    ax.axhline(chance, color="black", lw=0.6, ls=":", label="chance")


def plot_band(ax, steps, values, *, color, label: str, ls: str = "-") -> None:
    """Several seeds' curves (``values``: seeds x steps): their mean as a line, min-max as a
    band."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    ax.plot(steps, np.nanmean(values, 0), ls, color=color, lw=1.4, label=label)
    if len(values) > 1:
        ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=color,
                        alpha=0.15, lw=0)


# --------------------------------------------------------------------------------------------
# numbers in words


def format_steps(steps) -> str:
    """A step count for a table: ``never`` for None, ``1,500``, ``3.1e+07`` for floats."""
    if steps is None:
        return "never"
    return f"{steps:.3g}" if isinstance(steps, float) else f"{steps:,}"


def format_value(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_spread(spread, digits: int = 4, *, kind: str = "f") -> str:
    """A number over seeds (anything with ``mean``, ``std``, ``n``): ``0.8512 ± 0.0031 (n=5)``;
    ``kind`` ``"g"`` for numbers of any size (``digits`` significant), ``"d"`` for step counts
    (``1,500 ± 210``). ``None``: ``n/a``."""
    if spread is None:
        return "n/a"
    if kind == "d":
        text = f"{spread.mean:,.0f} ± {spread.std:,.0f}"
    else:
        text = f"{spread.mean:.{digits}{kind}} ± {spread.std:.{digits}{kind}}"
    return f"{text} (n={spread.n})"


def at_chance(accuracy: float, num_classes: int, test_size: int) -> bool:
    """Whether ``accuracy`` is within 2 standard errors of guessing (``1/num_classes``) on a
    test set of ``test_size`` examples."""
    chance = 1.0 / num_classes
    return accuracy <= chance + 2 * math.sqrt(chance * (1 - chance) / test_size)


def command_line() -> str:
    """The command that is running, as typed (``batchnorm ...``)."""
    return " ".join(["batchnorm"] + sys.argv[1:]) if sys.argv else ""
