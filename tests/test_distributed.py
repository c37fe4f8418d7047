"""Synchronized BN (batchnorm.distributed) against single-process BN on the concatenated batch.

Multi-process checks spawn gloo worlds on the CPU (torch.multiprocessing, file:// rendezvous in
tmp_path); spawning is slow, so each world runs many checks and hands its results back to the
test process, which computes the single-process references and compares. float64 throughout.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import rel_err
from multiproc import spawn
from torch import nn

import batchnorm
from batchnorm.distributed import (
    SyncBatchNorm,
    _exchange,
    merge_across_processes,
    merge_statistics,
    record_traffic,
)

TOL = 1e-12  # float64 relative error


def split(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return t.split(sizes)[rank]


def torch_bn(shape, **kwargs) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    return cls[len(shape)](shape[1], dtype=torch.float64, **kwargs)


# --------------------------------------------------------------------------------------------
# BN layer cases: forward, gradients, running statistics over several steps


def make_cases(world: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    uneven = {2: [7, 2], 3: [5, 0, 3]}[world]  # world 3 has an empty shard
    specs = [
        ((sum(uneven), 6), uneven, {}),
        ((sum(uneven), 3, 5, 4), uneven, {"momentum": None}),
        ((sum(uneven), 4, 7), uneven, {"affine": False}),
        ((sum(uneven), 2, 3, 2, 3), uneven, {"momentum": 0.3}),
        ((3 * world, 5, 4, 4), [3] * world, {"eps": 1e-3, "channels_last": True}),
        ((4 * world, 3), [4] * world, {"track_running_stats": False}),
    ]
    cases = []
    for shape, sizes, kwargs in specs:
        channels_last = kwargs.pop("channels_last", False)
        steps = [
            {"x": (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 40),  # offset
             "dy": torch.randn(shape, generator=g, dtype=torch.float64)}
            for _ in range(3)
        ]
        params = [torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5,
                  torch.randn(shape[1], generator=g, dtype=torch.float64)]
        if channels_last:
            for step in steps:
                step["x"] = step["x"].contiguous(memory_format=torch.channels_last)
        cases.append({"shape": shape, "sizes": sizes, "kwargs": kwargs, "steps": steps,
                      "params": params, "channels_last": channels_last})
    return cases


def run_case(case: dict, rank: int, module: nn.Module) -> dict:
    """Three training steps then one eval forward on this rank's shard."""
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(case["params"][0])
            module.bias.copy_(case["params"][1])
    outputs, grads, traffic = [], [], []
    module.train()
    for step in case["steps"]:
        x = split(step["x"], case["sizes"], rank).clone().requires_grad_()
        with record_traffic() as log:
            y = module(x)
            y.backward(split(step["dy"], case["sizes"], rank))
        if case["channels_last"]:  # the memory format is kept
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert x.grad.is_contiguous(memory_format=torch.channels_last)
        outputs.append(y.detach())
        grads.append(x.grad)
        traffic.append(log)
    module.eval()
    x = split(case["steps"][0]["x"], case["sizes"], rank)
    with record_traffic() as log:
        eval_out = module(x)
    result = {"y": outputs, "dx": grads, "traffic": traffic, "eval": eval_out.detach(),
              "eval_traffic": log}
    if module.affine:
        result["dw"], result["db"] = module.weight.grad, module.bias.grad
    if module.running_mean is not None:
        result["running"] = (module.running_mean.clone(), module.running_var.clone(),
                             module.num_batches_tracked.clone())
    return result


def reference_case(case: dict) -> dict:
    module = torch_bn(case["shape"], **case["kwargs"])
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(case["params"][0])
            module.bias.copy_(case["params"][1])
    outputs, grads = [], []
    for step in case["steps"]:
        x = step["x"].clone().requires_grad_()
        y = module(x)
        y.backward(step["dy"])
        outputs.append(y.detach())
        grads.append(x.grad)
    module.eval()
    result = {"y": outputs, "dx": grads, "eval": module(case["steps"][0]["x"]).detach()}
    if module.affine:
        result["dw"], result["db"] = module.weight.grad, module.bias.grad
    if module.running_mean is not None:
        result["running"] = (module.running_mean, module.running_var, module.num_batches_tracked)
    return result


def check_cases(cases, per_rank):
    """per_rank[r][i] is rank r's result for cases[i]."""
    world = len(per_rank)
    for i, case in enumerate(cases):
        ref = reference_case(case)
        results = [per_rank[r][i] for r in range(world)]
        label = f"case {i}: shape {case['shape']}, shards {case['sizes']}, {case['kwargs']}"
        for key in ("y", "dx"):
            for step in range(len(case["steps"])):
                got = torch.cat([res[key][step] for res in results])
                assert rel_err(got, ref[key][step]) < TOL, (label, key, step)
        if "dw" in ref:  # local parameter gradients sum to the full-batch ones
            for key in ("dw", "db"):
                got = sum(res[key] for res in results)
                assert rel_err(got, ref[key]) < TOL, (label, key)
        if "running" in ref:
            for res in results:  # bit-identical on every process
                for a, b in zip(res["running"], results[0]["running"], strict=True):
                    assert torch.equal(a, b), label
            for got, want in zip(results[0]["running"], ref["running"], strict=True):
                assert rel_err(got, want) < TOL, (label, "running")
            got = torch.cat([res["eval"] for res in results])
            assert rel_err(got, ref["eval"]) < TOL, (label, "eval")
        for res in results:
            channels = case["shape"][1]
            assert res["eval_traffic"] == [], label  # evaluation makes no collective call
            for log in res["traffic"]:  # one all_gather forward, one all_reduce backward
                assert log == [("all_gather", (2 * channels + 2) * 8),
                               ("all_reduce", 2 * channels * 8)], label


# --------------------------------------------------------------------------------------------
# DDP training of a small model against single-process training on the full batch


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), batchnorm.BatchNorm2d(4, activation="relu"),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.BatchNorm1d(8, momentum=None), nn.Tanh(),
        nn.Linear(8, 3),
    ).double()


def make_training_data(seed: int, batch: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 2, 6, 6, generator=g, dtype=torch.float64) + 1,
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def train_single(data, seed: int):
    model = small_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for x, t in data:
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    return model.state_dict()


def train_ddp(rank, world, data, sizes, seed: int):
    """Each rank trains on its shard; loss scaled so DDP's average is the full-batch mean loss
    (for equal shards that is the plain per-process mean loss)."""
    model = small_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)  # before the conversion
    model = batchnorm.convert(model, sync=True)
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 3
    ddp = nn.parallel.DistributedDataParallel(model)
    equal = len(set(sizes)) == 1
    for x, t in data:
        opt.zero_grad()
        logits = ddp(split(x, sizes, rank))
        target = split(t, sizes, rank)
        if equal:
            loss = F.cross_entropy(logits, target)
        else:
            loss = F.cross_entropy(logits, target, reduction="sum") * world / len(t)
        loss.backward()
        opt.step()
    return model.state_dict()


def check_training(states, reference):
    for state in states:
        assert state.keys() == reference.keys()
        for key, want in reference.items():
            assert torch.equal(state[key], states[0][key]), key  # replicas stay identical
            if want.is_floating_point():
                assert rel_err(state[key], want) < 1e-10, key
            else:
                assert torch.equal(state[key], want), key


# --------------------------------------------------------------------------------------------
# recalibrate in a distributed run


def recal_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 3 for n in (8, 6, 5)]


def recalibrate_worker(rank, world, batches, seed):
    """Synchronized layers: rank r recalibrates on its strided shard of each batch. Plain layers:
    the same, and recalibrate pools the per-process sums itself."""
    shards = [b[rank::world] for b in batches]
    synced = batchnorm.convert(small_model(seed), sync=True)
    batchnorm.recalibrate(synced, shards, progress=False)
    plain = small_model(seed)
    batchnorm.recalibrate(plain, shards, progress=False)
    return {"synced": synced.state_dict(), "plain": plain.state_dict()}


def check_recalibrate(results, batches, seed, world):
    full = batchnorm.recalibrate(small_model(seed), batches, progress=False).state_dict()
    shards = [b[r::world] for b in batches for r in range(world)]
    pooled = batchnorm.recalibrate(small_model(seed), shards, progress=False).state_dict()
    for res in results:
        for kind, want in (("synced", full), ("plain", pooled)):
            for key, value in want.items():
                if key.endswith(("running_mean", "running_var")):
                    assert rel_err(res[kind][key], value) < 1e-12, (kind, key)
        # the first layer's population mean is the data mean however the batches are grouped
        assert rel_err(res["plain"]["1.running_mean"], full["1.running_mean"]) < 1e-12


# --------------------------------------------------------------------------------------------
# the worlds


def world_of_three(rank, world, cases, data, sizes, seed):
    results = {"cases": [run_case(c, rank, SyncBatchNorm(c["shape"][1], dtype=torch.float64,
                                                          **c["kwargs"])) for c in cases]}
    results["ddp"] = train_ddp(rank, world, data, sizes, seed)
    # A subgroup: ranks 0 and 2 normalize over their two shards; rank 1 is not a member.
    group = dist.new_group([0, 2])
    case = cases[1]
    if rank != 1:
        results["subgroup"] = run_case(case, rank, SyncBatchNorm(
            case["shape"][1], process_group=group, dtype=torch.float64, **case["kwargs"]))
    else:
        bn = SyncBatchNorm(4, process_group=group, dtype=torch.float64)
        with pytest.raises(ValueError, match="process_group does not contain this process"):
            bn(torch.randn(4, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="process_group does not contain"):
            merge_across_processes(torch.zeros(4), torch.ones(4), 3, group)
        bn.eval()  # evaluation needs no communication, so no membership either
        assert bn(torch.randn(4, 4, dtype=torch.float64)).shape == (4, 4)
    return results


def world_of_two(rank, world, cases, data, sizes, seed, batches):
    results = {"cases": [run_case(c, rank, SyncBatchNorm(c["shape"][1], dtype=torch.float64,
                                                          **c["kwargs"])) for c in cases]}
    results["ddp"] = train_ddp(rank, world, data, sizes, seed)
    results["recalibrate"] = recalibrate_worker(rank, world, batches, seed)
    # Fewer than 2 values per channel in the global batch: every rank raises, none hangs.
    bn = SyncBatchNorm(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel in the global batch"):
        bn(torch.randn(1 - rank, 3, dtype=torch.float64))
    # A group of one process normalizes locally, like batchnorm.BatchNorm1d, with no exchange.
    solo = dist.new_group([0])
    if rank == 0:
        x = torch.randn(5, 3, dtype=torch.float64)
        with record_traffic() as log:
            y = SyncBatchNorm(3, process_group=solo, dtype=torch.float64)(x)
        assert log == []
        assert rel_err(y, batchnorm.BatchNorm1d(3, dtype=torch.float64)(x)) < TOL
        with pytest.raises(TypeError, match="residual must have input's dtype"):
            SyncBatchNorm(3, process_group=solo, dtype=torch.float64)(x, x.float())
    # The same argument checks when the statistics are exchanged, on every rank, before any
    # collective call (so no rank waits for another that raised).
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="residual must have input's dtype"):
        SyncBatchNorm(3, dtype=torch.float64)(x, x.float())
    with pytest.raises(ValueError, match="residual must have input's shape"):
        SyncBatchNorm(3, dtype=torch.float64)(x, x[:2])
    # float32: statistics exchanged and merged accurately despite an offset
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(7)) + 100
    bn = SyncBatchNorm(4)
    y = bn(x[rank::2])
    results["float32"] = (x, y.detach(), bn.running_mean, bn.running_var)
    # half precision: statistics in float32, output and input gradient in the input's dtype
    xb = x[rank::2].bfloat16().requires_grad_()
    yb = SyncBatchNorm(4)(xb)
    yb.float().square().sum().backward()
    assert yb.dtype == xb.grad.dtype == torch.bfloat16
    results["bfloat16"] = yb.detach()
    # fused activation and residual: relu(BN(x) + z)
    g = torch.Generator().manual_seed(8)
    x, z, dy = (torch.randn(6, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    xs = x[rank::2].clone().requires_grad_()
    zs = z[rank::2].clone().requires_grad_()
    y = SyncBatchNorm(3, activation="relu", dtype=torch.float64)(xs, zs)
    y.backward(dy[rank::2])
    results["residual"] = (x, z, dy, y.detach(), xs.grad, zs.grad)
    dist.barrier()
    return results


@pytest.mark.distributed
def test_three_processes_uneven_and_empty_shards(tmp_path):
    world, seed = 3, 11
    cases = make_cases(world, seed)
    sizes = [5, 0, 4]
    data = make_training_data(seed, sum(sizes), steps=4)
    results = spawn(tmp_path, world, world_of_three, cases, data, sizes, seed)
    check_cases(cases, [res["cases"] for res in results])
    check_training([res["ddp"] for res in results], train_single(data, seed))
    sub = cases[1]
    sub = dict(sub, sizes=[sub["sizes"][0], sub["sizes"][2]], steps=[
        {k: torch.cat([split(v, sub["sizes"], r) for r in (0, 2)]) for k, v in step.items()}
        for step in sub["steps"]])
    check_cases([sub], [[results[0]["subgroup"]], [results[2]["subgroup"]]])


@pytest.mark.distributed
def test_two_processes_ddp_recalibrate_errors(tmp_path):
    world, seed = 2, 5
    cases = make_cases(world, seed)
    sizes = [6, 6]
    data = make_training_data(seed, sum(sizes), steps=4)
    batches = recal_batches(seed)
    results = spawn(tmp_path, world, world_of_two, cases, data, sizes, seed, batches)
    check_cases(cases, [res["cases"] for res in results])
    check_training([res["ddp"] for res in results], train_single(data, seed))
    check_recalibrate([res["recalibrate"] for res in results], batches, seed, world)
    x, _, _, _ = results[0]["float32"]
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    y = ref(x.double())
    for rank, (_, got, mean, var) in enumerate(r["float32"] for r in results):
        assert rel_err(got, y[rank::2]) < 1e-5
        assert rel_err(mean, ref.running_mean) < 1e-7
        assert rel_err(var, ref.running_var) < 1e-5
        # against BN of the bfloat16-rounded input: only the output's rounding differs
        want = nn.BatchNorm2d(4, dtype=torch.float64)(x.bfloat16().double())[rank::2]
        assert rel_err(results[rank]["bfloat16"], want) < 1e-2
    x, z, dy, _, _, _ = results[0]["residual"]
    x, z = x.clone().requires_grad_(), z.clone().requires_grad_()
    y = torch.relu(nn.BatchNorm1d(3, dtype=torch.float64)(x) + z)
    y.backward(dy)
    for rank, res in enumerate(r["residual"] for r in results):
        for got, want in zip(res[3:], (y, x.grad, z.grad), strict=True):
            assert rel_err(got, want[rank::2]) < TOL


# --------------------------------------------------------------------------------------------
# single process: merging, conversion, errors


def pairwise_merge(counts, means, m2s):
    """Chan et al.'s pairwise update folded in order (float64 oracle for merge_statistics)."""
    n, mean, m2 = 0.0, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    for nb, mb, m2b in zip(counts.tolist(), means, m2s, strict=True):
        if nb == 0:
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta.square() * (n * nb / total)
        n = total
    return n, mean, m2


@pytest.mark.parametrize("sizes", [[5, 0, 9, 1], [0, 12], [3, 3, 3]])
def test_merge_statistics_matches_concatenation_and_pairwise(sizes, rng):
    channels = 4
    parts = [torch.randn(n, channels, generator=rng, dtype=torch.float64) * 5 + 1e4
             for n in sizes]
    counts = torch.tensor(sizes, dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(channels) for p in parts]).double()
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(channels)
                       for p in parts]).double()
    total, mean, m2 = merge_statistics(counts, means, m2s)
    full = torch.cat(parts)
    assert total.item() == sum(sizes)
    assert rel_err(mean, full.mean(0)) < 1e-15
    assert rel_err(m2 / total, full.var(0, unbiased=False)) < 1e-12
    n, pmean, pm2 = pairwise_merge(counts, means, m2s)
    assert n == sum(sizes) and rel_err(mean, pmean) < 1e-15 and rel_err(m2, pm2) < 1e-12


def test_exchange_encodes_large_counts_exactly():
    """Counts travel as two float32 integers: exact beyond float32's 2^24."""
    mean, m2 = torch.randn(3), torch.rand(3)
    for count in (0, 1, 2**24 - 1, 2**24 + 1, 3 * 2**30 + 12345):
        total, got_mean, got_m2 = _exchange(count, mean, m2, None, 1)
        assert int(total.item()) == count
        if count:
            assert torch.equal(got_mean.float(), mean) and torch.equal(got_m2.float(), m2)


@pytest.mark.parametrize("source", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                    batchnorm.BatchNorm2d])
@pytest.mark.parametrize("affine, track", [(True, True), (False, False)])
def test_from_batchnorm_shares_everything(source, affine, track):
    bn = source(5, eps=1e-3, momentum=0.2, affine=affine, track_running_stats=track,
                dtype=torch.float64).eval()
    sync = SyncBatchNorm.from_batchnorm(bn, process_group=None)
    assert isinstance(sync, SyncBatchNorm) and not sync.training
    assert (sync.eps, sync.momentum, sync.affine, sync.track_running_stats) == (
        1e-3, 0.2, affine, track)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(sync, name) is getattr(bn, name)
    assert sync.state_dict().keys() == bn.state_dict().keys()
    back = sync.to_batchnorm()
    ours = batchnorm.modules.TORCH_TO_OURS.get(source, source)
    assert type(back) is ours
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(back, name) is getattr(bn, name)


def test_convert_sync_keeps_optimizer_and_round_trips(rng):
    model = small_model(3)
    model[4].backend = "torch"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    batchnorm.convert(model, sync=True)
    syncs = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert len(syncs) == 3
    assert syncs[1].activation == "relu" and syncs[1].backend == "torch"
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params, strict=True))
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in params)
    batchnorm.convert(model, to="batchnorm")
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [batchnorm.BatchNorm2d, batchnorm.BatchNorm2d, batchnorm.BatchNorm1d]
    assert model[4].activation == "relu"
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_without_process_group_runs_as_plain_batch_norm(rng):
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(6, 3, 4, 4, generator=rng, dtype=torch.float64) * 2 + 1
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    ref(x)  # some running statistics
    sync = SyncBatchNorm.from_batchnorm(copy.deepcopy(ref)).eval()
    ref.eval()
    assert rel_err(sync(x), ref(x)) < TOL
    no_stats = SyncBatchNorm(3, track_running_stats=False, dtype=torch.float64).eval()
    assert rel_err(no_stats(x), F.batch_norm(x, None, None, training=True)) < TOL
    # training without a process group: plain BN, as torch.nn.SyncBatchNorm does
    sync.train()
    reference = nn.SyncBatchNorm(3, dtype=torch.float64)
    reference.load_state_dict(sync.state_dict())
    xs = (x.clone().requires_grad_(), x.clone().requires_grad_())
    y_ours, y_ref = sync(xs[0]), reference(xs[1])
    assert rel_err(y_ours, y_ref) < TOL
    y_ours.sin().sum().backward()
    y_ref.sin().sum().backward()
    assert rel_err(xs[0].grad, xs[1].grad) < TOL
    assert rel_err(sync.weight.grad, reference.weight.grad) < TOL
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert rel_err(getattr(sync, name), getattr(reference, name)) < TOL
    # merging statistics is a collective: it needs the process group
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed"):
        merge_across_processes(torch.zeros(3), torch.ones(3), 4)


def test_bad_arguments():
    bn = SyncBatchNorm(3).eval()
    with pytest.raises(ValueError, match="rank >= 2"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="num_features=3"):
        bn(torch.randn(4, 5))
    with pytest.raises(ValueError, match="activation must be"):
        SyncBatchNorm(3, activation="gelu")
    with pytest.raises(TypeError, match="must be a BatchNorm layer"):
        SyncBatchNorm.from_batchnorm(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pass cls"):
        bn.to_batchnorm()
    assert type(bn.to_batchnorm(nn.BatchNorm1d)) is nn.BatchNorm1d


# --------------------------------------------------------------------------------------------
# the launcher path of a reproduction command


FASHION = Path(os.environ.get("BATCHNORM_TEST_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("batchnorm.repro.mnist") is None,
                    reason="batchnorm.repro.mnist does not exist yet")
@pytest.mark.skipif(not FASHION.is_dir(), reason=f"no Fashion-MNIST data in {FASHION}")
def test_torchrun_reproduce_mnist_matches_single_process(tmp_path):
    """``torchrun --nproc_per_node=2`` runs the command data-parallel (DDP, synchronized BN,
    rank 0 writes) and, on a tiny run, reproduces the single-process metrics."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to the interpreter")
    arguments = ["-m", "batchnorm", "reproduce", "mnist", "--dataset", "fashion-mnist",
                 "--data-dir", str(FASHION), "--no-download", "--steps", "20",
                 "--eval-every", "10", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    metrics = {}
    for name, launcher in (("ddp", [torchrun, "--standalone", "--nproc_per_node=2"]),
                           ("single", [sys.executable])):
        out = tmp_path / name
        done = subprocess.run([*launcher, *arguments, "--out", str(out)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp"]["config"]["processes"] == 2
    assert metrics["single"]["config"]["processes"] == 1
    for network in ("no_bn", "bn"):
        ddp = metrics["ddp"]["networks"][network]["history"]
        single = metrics["single"]["networks"][network]["history"]
        assert [h["step"] for h in ddp] == [h["step"] for h in single]
        for a, b in zip(ddp, single, strict=True):  # float32: summation order differs
            assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 3e-4
            for key in ("train_loss", "p15", "p50", "p85"):
                if b[key] is not None:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (network, key)
    final_ddp = metrics["ddp"]["networks"]["bn"]["final"]
    final_single = metrics["single"]["networks"]["bn"]["final"]
    for key in ("moving_average", "batch_statistics", "recalibrated"):
        assert abs(final_ddp[key] - final_single[key]) <= 3e-4, key
