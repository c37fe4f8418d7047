"""``batchnorm reproduce memory``: the saved-bytes counter on cases computed by hand, in-place
ABN's blocks at half of BN + leaky ReLU's, the peak, the command end to end at tiny sizes."""

import json

import pytest
import torch
from torch import nn

from batchnorm import cli
from batchnorm.models.inception import InceptionBN
from batchnorm.models.resnet import PreActResNet
from batchnorm.repro.memory import VARIANTS
from batchnorm.repro.saved_memory import SavedTensors, peak_memory


def _is_bn(module):
    return isinstance(module, nn.BatchNorm2d)


def test_linear_saves_its_input_and_the_weight_only_when_the_input_needs_a_gradient():
    layer = nn.Linear(10, 5)
    with SavedTensors(layer) as saved:
        layer(torch.randn(4, 10)).sum()
    # dL/dW = dy^T x needs x (4 x 10 float32 = 160 bytes); dL/dx is not needed: W not saved
    assert saved.as_dict() == dict(total_bytes=160, block_bytes=0, shared_bytes=0,
                                   parameter_bytes=0, storages=1)
    with SavedTensors(layer) as saved:
        layer(torch.randn(4, 10, requires_grad=True)).sum()
    assert (saved.total_bytes, saved.parameter_bytes) == (160, 5 * 10 * 4)  # now W too


def test_a_storage_saved_several_times_or_through_a_view_counts_once_at_full_size():
    x = torch.randn(4, 10, requires_grad=True)
    with SavedTensors(nn.Identity()) as saved:
        y = x.relu()  # relu saves its output y
        (y * y).sum()  # mul saves y twice
        (y[:, :2] * 3.0).sum()  # nothing saved: a constant factor
        y[:1].exp().sum()  # exp saves its own (new) output: 1 x 10
    assert saved.storages == 2
    assert saved.total_bytes == 160 + 40


@pytest.mark.parametrize("variant, block, shared, total", [
    # per BN + act layer, on a 2x4x8x8 float32 map (2048 bytes): BN keeps its input x and the
    # per-channel mean and invstd (our CPU kernels: one float64 (2, 4) tensor, 64 bytes); ReLU
    # its output z (the next conv's input: shared), leaky ReLU its input y; in-place ABN only z
    # and invstd (float32). Outside the block: the network input (2x1x8x8, 512 bytes) and, for
    # leaky ReLU, z saved by the next conv.
    ("bn-relu", 2048 + 64 + 2048, 2048, 512 + 4160),
    ("bn-leaky-relu", 2048 + 64 + 2048, 0, 512 + 4160 + 2048),
    ("inplace-abn", 2048 + 16, 2048, 512 + 2064),
])
def test_bn_act_block_bytes_by_hand(variant, block, shared, total):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), VARIANTS[variant][1](4, "relu"),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False))
    with SavedTensors(net, _is_bn) as saved:
        net(torch.randn(2, 1, 8, 8)).sum()
    assert (saved.block_bytes, saved.shared_bytes, saved.total_bytes) == (block, shared, total)


def test_norm_factory_builds_every_bn_act_layer_of_the_models():
    abn = VARIANTS["inplace-abn"][1]
    for model, default in ((InceptionBN(10, 1, stem="small", width=0.05, norm=abn),
                            InceptionBN(10, 1, stem="small", width=0.05)),
                           (PreActResNet(10, 1, width=4, norm=abn), PreActResNet(10, 1, width=4))):
        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert layers and all(type(m).__name__ == "InPlaceABN2d" for m in layers)
        assert [p.shape for p in model.parameters()] == [p.shape for p in default.parameters()]


def test_inplace_abn_blocks_save_half_of_bn_leaky_relu_on_a_resnet():
    saved = {}
    for variant in ("bn-leaky-relu", "inplace-abn"):
        torch.manual_seed(0)
        net = PreActResNet(10, 1, width=4, blocks=1, stages=2, norm=VARIANTS[variant][1])
        with SavedTensors(net, _is_bn) as counter:
            net(torch.randn(2, 1, 8, 8)).sum()
        saved[variant] = counter.block_bytes
    # 5 BN + act layers on maps of 2x4x8x8 (norm1 of block 1, norm2 of block 1), 2x4x8x8
    # (norm1 of block 2), 2x8x4x4 (norm2 of block 2, head): 4 x 2048 + ... bytes
    maps = 2048 + 2048 + 2048 + 1024 + 1024
    per_channel = 3 * 4 + 2 * 8  # channels of the five layers
    assert saved["bn-leaky-relu"] == 2 * maps + per_channel * 2 * 8  # float64 mean, invstd
    assert saved["inplace-abn"] == maps + per_channel * 4
    assert saved["inplace-abn"] / saved["bn-leaky-relu"] == pytest.approx(0.5, abs=0.01)


def test_peak_memory_on_the_cpu_is_the_largest_live_allocation():
    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = a + 1  # 8 MB live
        del a
        return (b * 2).sum()  # 8 MB again (b and the product), then freed

    peak = peak_memory(work, "cpu")
    assert 8_000_000 <= peak < 8_000_000 + 4096


TINY = ["reproduce", "memory", "--dataset", "synthetic", "--train-subset", "0",
        "--test-subset", "0", "--steps", "6", "--eval-every", "3", "--batch-size", "16",
        "--train-eval", "50", "--inception-width", "0.05", "--inception-image-size", "32",
        "--memory-batch-size", "4", "--width", "4", "--blocks", "1", "--no-progress"]


def test_command_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "memory"
    assert cli.main([*TINY, "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["network"], r["variant"]) for r in results["memory"]} == {
        (n, v) for n in ("BN-Inception", "PreActResNet") for v in VARIANTS}
    for ratio in results["ratios"]:
        if ratio["baseline"] == "bn-leaky-relu":
            assert ratio["block_bytes_ratio"] == pytest.approx(0.5, abs=0.01)
            assert ratio["total_bytes_ratio"] < 1 and ratio["peak_bytes_ratio"] < 1
    assert results["seeds"] == [0, 1]
    accuracy = results["training"]["inplace-abn"]["final_accuracy"]
    seed_runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert accuracy["values"] == [next(r for r in rec["runs"] if r["variant"] == "inplace-abn")
                                  ["final_accuracy"] for rec in seed_runs]
    assert set(results["verdicts"]) == {"final_accuracy", "best_accuracy", "train_accuracy"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("network,variant,")
    summary = (out / "summary.md").read_text()
    assert "up to 50%" in summary and "exceed" in summary
    assert (out / "figure.png").stat().st_size > 0

    capsys.readouterr()
    assert cli.main([*TINY, "--seeds", "2", "--resume", "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["training"] == results["training"]
    assert [r["total_bytes"] for r in again["memory"]] == [r["total_bytes"]
                                                          for r in results["memory"]]


@pytest.mark.parametrize("option, value, words", [
    ("--variants", "bn-relu,foo", "--variants must be"),
    ("--memory-batch-size", "1", "--memory-batch-size must be >= 2"),
    ("--lr", "0", "--lr must be positive"),
    ("--seeds", "0", "--seeds must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, option, value, words):
    assert cli.main([*TINY, option, value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
