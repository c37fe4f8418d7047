r"""Several seeds of one experiment: run them, summarize a number over them, and say whether a
difference between two conditions is larger than the seeds' own scatter.

Running (``--seeds N``): :func:`run_seeds` runs an experiment's per-seed command for the seeds
``s0, s0 + 1, ..., s0 + N - 1`` (``s0`` = ``--seed``), each into its own folder
``OUT/seed-<s>/`` with everything a one-seed run writes there. A finished seed leaves a marker
(``seed-done.json``, its settings); with ``--resume`` a seed whose marker has the same settings
is not run again, so a multi-seed run that was stopped continues where it was.

Summarizing: :func:`spread` is the mean, the sample standard deviation (``ddof = 1``; 0 for one
seed), the minimum, the maximum and the number of seeds; :func:`~batchnorm.repro.report.
format_spread` writes it as ``0.8512 ± 0.0031 (n=5)``.

The noise rule (:data:`RULE`, :func:`compare`): a difference between two conditions "exceeds
seed noise" when Welch's two-sided t-test on their per-seed values rejects equal means at
``alpha = 0.05``: :math:`t = (\bar b - \bar a) / \sqrt{s_a^2/n_a + s_b^2/n_b}` with the
Welch-Satterthwaite degrees of freedom. It treats the seeds of the two conditions as
independent samples (conservative: our conditions share the seeds, i.e. the mini-batch order,
so a paired test would be more sensitive). With one seed on either side nothing can be said
(``n/a``). When both conditions have no scatter at all (e.g. every seed ended exactly at chance)
any difference of the means counts as exceeding it. A difference within the noise is not
evidence of equality: with 3 seeds only large effects are detected.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from batchnorm.repro.common import ArgumentError, is_main_process, log, write_json
from batchnorm.repro.report import command_line, format_spread

ALPHA = 0.05
RULE = ("A difference exceeds seed noise when Welch's two-sided t-test on the per-seed values "
        f"rejects equal means at alpha = {ALPHA} (p-values in brackets); std is the sample "
        "standard deviation over seeds, n the number of seeds. With 1 seed no verdict is "
        "possible (n/a); a difference within the noise is not evidence of equality.")
MARKER = "seed-done.json"
STOPPED = "stopped"  # what a per-seed run returns when it stopped early on purpose (--stop-at)
# arguments that do not change a seed's numbers (not compared when resuming)
VOLATILE = {"out", "seed", "seeds", "resume", "progress", "threads", "workers", "note",
            "seed_command"}


# --------------------------------------------------------------------------------------------
# running


def add_arguments(parser: argparse.ArgumentParser, *, resume: bool = True,
                  folders_for_one: bool = False, default: int = 1) -> None:
    """``--seeds N`` (and ``--resume`` unless the command has its own); ``folders_for_one``:
    as :func:`run_command`'s; ``default``: the number of seeds without the option."""
    parser.add_argument("--seeds", type=int, default=default,
                        help="run seeds --seed, --seed+1, ..., each into OUT/seed-<s>/, and "
                             f"report mean ± std over them (default {default}"
                             + (")" if folders_for_one or default != 1
                                else ": one run into OUT)"))
    parser.set_defaults(_seeds_default=default)
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="with --seeds: keep the seeds already finished with the same "
                                 "settings")


def seed_folder(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def seed_list(first: int, n: int) -> list[int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError(f"--seeds must be a positive whole number, got {n!r}")
    return list(range(first, first + n))


def settings(args: argparse.Namespace) -> dict:
    """What must be equal for a finished seed to be kept: the arguments that change numbers."""
    return {k: v for k, v in sorted(vars(args).items())
            if not k.startswith("_") and k not in VOLATILE
            and isinstance(v, (str, int, float, bool, type(None), list, tuple))}


def command_for_seed(seed: int, out: Path, argv: Sequence[str] | None = None, *,
                     one_seed: bool = False) -> str:
    """The command line (``batchnorm ...``) that runs one seed alone: the running command
    (``argv``, default ``sys.argv[1:]``) without ``--seeds``, ``--seed``, ``--out`` and
    ``--resume``, with ``--seed <seed> --out <out>`` (and ``--seeds 1`` before them if
    ``one_seed``: for a command whose default is several seeds)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in ("--seeds", "--seed", "--out"):
            skip = "=" not in token
            continue
        if token != "--resume":
            kept.append(token)
    return " ".join(["batchnorm", *kept, *(["--seeds", "1"] if one_seed else []), "--seed",
                     str(seed), "--out", str(out)])


def run_seeds(args: argparse.Namespace, run_one: Callable[[argparse.Namespace], int],
              experiment: str) -> list[Path] | int:
    """Run ``run_one(args')`` for each seed of ``--seed``/``--seeds``, ``args'`` being ``args``
    with ``seed`` and ``out`` (``OUT/seed-<s>``) set, ``seeds = 1`` and ``seed_command`` (the
    command of that seed alone). Returns the seed folders, or an exit status: the first
    non-zero one, or 0 when a seed returned :data:`STOPPED` (not finished, not an error)."""
    folders = []
    for seed in seed_list(args.seed, args.seeds):
        folder = seed_folder(args.out, seed)
        one = copy.copy(args)
        one.seed, one.out, one.seeds = seed, str(folder), 1
        one.seed_command = command_for_seed(
            seed, folder, one_seed=getattr(args, "_seeds_default", 1) != 1)
        marker = folder / MARKER
        done = marker.exists() and json.loads(marker.read_text()) == settings(one)
        if done and getattr(args, "resume", False):
            log(f"{experiment}: seed {seed} already finished in {folder}, kept (--resume)")
        else:
            log(f"{experiment}: seed {seed} ({len(folders) + 1}/{args.seeds}) -> {folder}")
            marker.unlink(missing_ok=True)
            code = run_one(one)
            if code == STOPPED:
                return 0
            if code:
                return code
            write_json(marker, settings(one))
        folders.append(folder)
    return folders


def run_command(args: argparse.Namespace, run_one: Callable[[argparse.Namespace], int | str],
                experiment: str, summarize: Callable[[Path, list[Path], float], None], *,
                folders_for_one: bool = False) -> int:
    """A command with ``--seeds``: with one seed (unless ``folders_for_one``), ``run_one(args)``
    into ``OUT`` as before; else :func:`run_seeds` and then, on the main process,
    ``summarize(OUT, seed folders, seconds)``. Returns the exit status."""
    if args.seeds == 1 and not folders_for_one:
        code = run_one(args)
        return 0 if code == STOPPED else code
    started = time.perf_counter()
    folders = run_seeds(args, run_one, experiment)
    if isinstance(folders, int):
        return folders
    if is_main_process():
        summarize(Path(args.out), folders, time.perf_counter() - started)
    return 0


def command() -> str:
    """The running command without ``--resume``: what reproduces every seed from scratch."""
    return " ".join(t for t in command_line().split(" ") if t != "--resume")


def read_seeds(folders: Sequence[Path], name: str) -> list[dict]:
    """The JSON file ``name`` of every seed folder."""
    return [json.loads((Path(folder) / name).read_text()) for folder in folders]


# --------------------------------------------------------------------------------------------
# summarizing


def describe(values: Sequence[float | None], digits: int = 4, kind: str = "f") -> str:
    """Per-seed ``values`` in a table cell: ``mean ± std (n=N)``; where some are ``None`` (e.g.
    a threshold not reached), the spread of the others and how many are missing."""
    present = [v for v in values if v is not None]
    if len(present) == len(values):
        return format_spread(spread(values), digits, kind=kind)
    missing = f"not reached in {len(values) - len(present)} of {len(values)}"
    if not present:
        return missing
    return f"{format_spread(spread(present), digits, kind=kind)}; {missing}"


def noise_text(a: Sequence[float | None], b: Sequence[float | None]) -> str:
    """:func:`compare`'s verdict as text; ``n/a`` where a value is missing (``None``)."""
    if any(v is None for v in (*a, *b)):
        return "n/a (not reached in every seed)"
    return compare(a, b).text


@dataclass(frozen=True)
class Spread:
    """A number over seeds."""

    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one seed
    min: float
    max: float
    n: int
    values: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return format_spread(self)


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample std, min, max and count of finite ``values`` (at least one)."""
    v = [float(x) for x in values]
    if not v or not all(math.isfinite(x) for x in v):
        raise ValueError(f"spread needs at least one value, all finite; got {values!r}")
    n = len(v)
    mean = math.fsum(v) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return Spread(mean, std, min(v), max(v), n, tuple(v))


@dataclass(frozen=True)
class Verdict:
    """Whether ``b - a`` exceeds seed noise (:func:`compare`)."""

    difference: float  # mean(b) - mean(a)
    p_value: float | None  # None: fewer than 2 seeds on a side
    exceeds: bool | None  # None: no verdict possible

    @property
    def text(self) -> str:
        if self.exceeds is None:
            return "n/a (1 seed)"
        p = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"
        return f"{'yes' if self.exceeds else 'no'} ({p})"

    def as_dict(self) -> dict:
        return dict(asdict(self), text=self.text)


def compare(a: Sequence[float] | Spread, b: Sequence[float] | Spread,
            alpha: float = ALPHA) -> Verdict:
    """Welch's two-sided t-test of mean(b) = mean(a) over per-seed values (module doc)."""
    a = a if isinstance(a, Spread) else spread(a)
    b = b if isinstance(b, Spread) else spread(b)
    difference = b.mean - a.mean
    if a.n < 2 or b.n < 2:
        return Verdict(difference, None, None)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    if va + vb == 0:
        p = 0.0 if difference != 0 else 1.0
    else:
        t = difference / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
        p = t_test_p(t, df)
    return Verdict(difference, p, p < alpha)


def t_test_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom:
    ``I_{df / (df + t^2)}(df / 2, 1 / 2)`` (regularized incomplete beta)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz),
    using the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` where that converges faster."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a
