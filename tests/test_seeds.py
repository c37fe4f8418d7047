"""The seeds helper (:mod:`batchnorm.repro.seeds`): spreads, the noise verdict, running seeds."""

import argparse
import json
import math

import pytest

from batchnorm.repro.report import format_spread
from batchnorm.repro.seeds import (
    MARKER,
    command_for_seed,
    compare,
    run_seeds,
    seed_list,
    spread,
    t_test_p,
)


@pytest.mark.parametrize("t, df, p", [
    (12.7062, 1, 0.05), (2.776445, 4, 0.05), (2.0, 30, 0.054625), (0.0, 5, 1.0),
    (4.604095, 4, 0.01), (1.959964, 1e6, 0.05), (-2.776445, 4, 0.05),
])
def test_t_test_p_matches_tables(t, df, p):
    assert t_test_p(t, df) == pytest.approx(p, abs=2e-6)


def test_spread_and_format():
    s = spread([0.85, 0.86, 0.87])
    assert (s.mean, s.min, s.max, s.n) == (pytest.approx(0.86), 0.85, 0.87, 3)
    assert s.std == pytest.approx(0.01)
    assert str(s) == "0.8600 ± 0.0100 (n=3)"
    assert format_spread(spread([1500, 1250, 1750]), kind="d") == "1,500 ± 250 (n=3)"
    assert format_spread(None) == "n/a"
    one = spread([2.0])
    assert one.std == 0.0 and str(one) == "2.0000 ± 0.0000 (n=1)"
    with pytest.raises(ValueError):
        spread([])
    with pytest.raises(ValueError):
        spread([1.0, math.nan])


def test_compare_is_welch():
    v = compare([1, 2, 3], [4, 5, 6])
    # t = 3 / sqrt(2/3), df = 4
    assert v.difference == 3 and v.p_value == pytest.approx(0.021312, abs=1e-6) and v.exceeds
    assert v.text == "yes (p = 0.021)"
    unequal = compare([1.0, 1.1, 0.9, 1.0], [1.5, 3.0, 0.5])  # df from Welch-Satterthwaite
    assert not unequal.exceeds and 0.3 < unequal.p_value < 0.7
    assert compare([1.0], [2.0]).text == "n/a (1 seed)"
    assert compare([0.1, 0.1], [0.1, 0.1]).text == "no (p = 1.000)"
    assert compare([0.1, 0.1], [0.8, 0.8]).text == "yes (p < 0.001)"  # no scatter at all


def test_command_for_seed():
    argv = ["reproduce", "depth", "--seeds", "5", "--out", "results/depth", "--seed=2",
            "--resume", "--lr", "0.1"]
    assert command_for_seed(3, "r/seed-3", argv) == (
        "batchnorm reproduce depth --lr 0.1 --seed 3 --out r/seed-3")
    # a command whose default is several seeds: the seed's command says --seeds 1
    assert command_for_seed(3, "r/seed-3", argv, one_seed=True) == (
        "batchnorm reproduce depth --lr 0.1 --seeds 1 --seed 3 --out r/seed-3")


def test_run_seeds_folders_and_resume(tmp_path):
    calls = []

    def run_one(args):
        calls.append(args.seed)
        (tmp_path / f"seed-{args.seed}").mkdir(parents=True, exist_ok=True)
        assert args.seeds == 1 and args.out == str(tmp_path / f"seed-{args.seed}")
        assert args.seed_command.endswith(f"--seed {args.seed} --out {args.out}")
        return 0

    args = argparse.Namespace(seed=4, seeds=3, out=str(tmp_path), resume=False, lr=0.1)
    folders = run_seeds(args, run_one, "test")
    assert calls == [4, 5, 6] and [f.name for f in folders] == ["seed-4", "seed-5", "seed-6"]
    assert json.loads((folders[0] / MARKER).read_text()) == {"lr": 0.1}
    args.resume = True
    assert run_seeds(args, run_one, "test") == folders and calls == [4, 5, 6]
    args.lr = 0.2  # other settings: run again
    assert run_seeds(args, run_one, "test") == folders and calls == [4, 5, 6] * 2
    args.resume = False
    assert run_seeds(args, lambda a: 3, "test") == 3  # the first failure is returned
    assert not (folders[0] / MARKER).exists()  # a failed seed is not marked finished
    with pytest.raises(ValueError, match="--seeds"):
        seed_list(0, 0)
