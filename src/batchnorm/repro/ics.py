"""``batchnorm reproduce ics``: how does BN help? Training speed, distributional stability,
internal covariate shift and smoothness, side by side (Santurkar et al. 2018 on our networks).

Protocol. Two architectures on Fashion-MNIST: a VGG-style CNN (:class:`~batchnorm.models.vgg.
VGGNet`, ReLU, SGD with momentum) and the paper's Figure 1 MLP (784-100-100-100-10 sigmoid,
plain SGD; :func:`~batchnorm.models.mlp.sigmoid_mlp`). Each is trained three ways:

- ``no_bn``: no normalization (the layers keep their biases);
- ``bn``: BN before every nonlinearity;
- ``noisy_bn``: the BN network with time-varying, non-zero-mean, non-unit-variance noise added
  after every BN layer (:func:`batchnorm.probes.add_noise_after_bn`: per step and channel
  ``mu ~ U(-a, a)``, ``sigma ~ U(b0, b1)``, every element ``+ N(mu, sigma^2)``; Santurkar et
  al.'s "noisy BatchNorm"; the ranges are ours, see the summary).

For seed ``s`` all three start from the same initial weights (generator ``s + 1``; the weights
of the BN networks are the plain network's, minus the biases), see the same mini-batches
(permutations from ``s``) at the same learning rate; the noise has seed ``s``. Training is the
shared :class:`~batchnorm.repro.trainer.Trainer` (:class:`ProbedTrainer` adds the probes).

Readings, per run:

- training speed: the training loss and accuracy of the mini-batches (the network as it trains,
  noise included), averaged between evaluations; test accuracy (eval mode; noisy BN with its
  noise, as the later BN layers' moving averages were collected under it, and at the end also
  without: ``clean_accuracy``);
- distributional stability (the BN paper's ICS): at every evaluation the 15/50/85th percentiles
  of every unit's input to every nonlinearity (ReLU/sigmoid) over a fixed batch of test images,
  the network in training mode on a copy (so the noise of that step is in, and nothing is
  advanced); :func:`batchnorm.probes.layer_drift` per layer at the end;
- ICS as gradient change (Santurkar's Definition 2.1): :func:`batchnorm.probes.gradient_ics` at
  ``--probes`` evenly spaced steps, with the training optimizer's exact step, reported for the
  weight layers (convolutions and linear layers: the same names in all three networks);
- smoothness: :func:`batchnorm.probes.landscape_smoothness` at the same steps, moving along the
  gradient by ``--step-sizes`` times the learning rate.

Writes, per seed, ``seed-<s>/metrics.json``; then (:mod:`batchnorm.repro.ics_report`)
``summary.md``, ``results.json``, ``metrics.csv``, ``probes.csv`` and four figures.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from batchnorm.models.mlp import sigmoid_mlp
from batchnorm.models.vgg import VGGNet
from batchnorm.monitor import ActivationMonitor
from batchnorm.probes import (
    TimeVaryingNoise,
    add_noise_after_bn,
    batch_loss,
    gradient_ics,
    landscape_smoothness,
    layer_drift,
)
from batchnorm.repro import seeds
from batchnorm.repro.common import (
    ArgumentError,
    add_data_arguments,
    check_arguments,
    log,
    parse_numbers,
    prepare_out_dir,
    setup_run,
    write_json,
)
from batchnorm.repro.ics_report import write_report
from batchnorm.repro.image_data import load_for
from batchnorm.repro.trainer import Trainer, TrainSpec

# per architecture: what ``--vgg-*`` / ``--mlp-*`` default to
ARCHS = {
    "vgg": dict(steps=1000, batch_size=64, lr=0.02, momentum=0.9),
    "mlp": dict(steps=3000, batch_size=60, lr=1.0, momentum=0.0, init_std=0.1),
}
DEFAULTS = dict(archs="vgg,mlp", width=16, probes=10, evals=20, test_subset=2000,
                monitor_examples=500, noise_mean=0.5, noise_std="1,1.25",
                step_sizes="0.25,0.5,1,2,4", target=0.80)
NETWORKS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
OPTIONS = [  # (option, type, help); defaults from DEFAULTS
    ("width", int, "VGG: channels of the first block"),
    ("probes", int, "ICS and smoothness probes per run, evenly spaced from step 0"),
    ("evals", int, "evaluations (test accuracy, input percentiles) per run"),
    ("test-subset", int, "test images evaluated (0: all)"),
    ("monitor-examples", int, "test images whose layer inputs give the percentiles"),
    ("noise-mean", float, "noisy BN: the noise means are uniform on (-a, a)"),
    ("noise-std", str, "noisy BN: the noise standard deviations are uniform on (b0, b1)"),
    ("step-sizes", str, "smoothness probe: steps along the gradient, in learning rates"),
    ("target", float, "training accuracy whose first crossing measures speed"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default), mnist, synthetic (tests)")
    add_data_arguments(parser)
    parser.add_argument("--archs", default=DEFAULTS["archs"], help="vgg, mlp or both")
    for arch, config in ARCHS.items():
        parser.add_argument(f"--{arch}-steps", type=int, default=config["steps"])
        parser.add_argument(f"--{arch}-lr", type=float, default=config["lr"],
                            help=f"learning rate (all three {arch} networks)")
    for name, kind, text in OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=DEFAULTS[name.replace("-", "_")],
                            help=text)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    seeds.add_arguments(parser, folders_for_one=True)
    parser.add_argument("--out", default="results/ics")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def check(args) -> list[str]:
    """The architectures to run; :class:`ArgumentError` for arguments that cannot run."""
    check_arguments(args, at_least=dict(vgg_steps=1, mlp_steps=1, width=1, probes=1, evals=1,
                                        monitor_examples=2, test_subset=0, seeds=1),
                    positive=("vgg_lr", "mlp_lr", "noise_mean"))
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or set(archs) - set(ARCHS):
        raise ArgumentError(f"--archs must name some of {list(ARCHS)}, got {args.archs!r}")
    _noise_std(args)
    parse_numbers(args.step_sizes, "--step-sizes")
    return archs


def run(args) -> int:
    started = time.perf_counter()
    archs = check(args)
    device = setup_run(args)
    data = {}
    for arch in archs:  # the same test subset for every seed
        data[arch] = load_for(argparse.Namespace(**{**vars(args), "seed": 0, "train_subset": 0}),
                              flatten=arch == "mlp")
        if data[arch] is None:
            return 2
    return seeds.run_command(
        args, lambda one: run_seed(one, archs, data, device), "ics",
        lambda out, folders, seconds: write_report(
            out, args, folders, archs, seconds=time.perf_counter() - started,
            sizes=data[archs[0]].sizes()),
        folders_for_one=True)


def run_seed(args, archs: list[str], data: dict, device) -> int:
    """All networks of one seed; writes ``metrics.json`` to ``args.out``."""
    out = prepare_out_dir(args.out)
    runs = {arch: {name: train_network(arch, name, data[arch], args, device)
                   for name in NETWORKS} for arch in archs}
    write_json(out / "metrics.json", dict(experiment="ics", seed=args.seed,
                                          command=args.seed_command, runs=runs))
    return 0


def build(arch: str, network: str, data, args) -> tuple[nn.Module, list[str]]:
    """The network and the names of its nonlinearities (whose inputs are watched)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    if arch == "vgg":
        model = VGGNet(data.num_classes, data.in_channels, width=args.width,
                       image_size=data.image_size, generator=generator,
                       **({"norm": None} if network == "no_bn" else {}))
    else:
        model = sigmoid_mlp(data.train[0].shape[1], data.num_classes, bn=network != "no_bn",
                            init_std=ARCHS["mlp"]["init_std"], generator=generator)
    if network == "noisy_bn":
        low, high = _noise_std(args)
        # evaluated with its noise (of the current step): the later BN layers' moving
        # averages were collected under it
        add_noise_after_bn(model, args.noise_mean, (low, high), seed=args.seed,
                           eval_noise=True)
    kind = nn.ReLU if arch == "vgg" else nn.Sigmoid
    return model, [n for n, m in model.named_modules() if isinstance(m, kind)]


def _noise_std(args) -> tuple[float, float]:
    values = parse_numbers(args.noise_std, "--noise-std")
    if len(values) > 2 or values[0] > values[-1]:
        raise ArgumentError(f"--noise-std must be b0,b1 with b0 <= b1, got {args.noise_std!r}")
    return values[0], values[-1]


def train_network(arch: str, network: str, data, args, device) -> dict:
    config = ARCHS[arch]
    steps, lr = getattr(args, f"{arch}_steps"), getattr(args, f"{arch}_lr")
    model, watched = build(arch, network, data, args)
    spec = TrainSpec(steps=steps, batch_size=config["batch_size"], lr=lr,
                     momentum=config["momentum"], eval_every=max(1, steps // args.evals),
                     seed=args.seed, progress=args.progress, log_evaluations=False,
                     label=f"seed {args.seed} {arch} {NETWORKS[network]}")
    probe_steps = range(0, steps, max(1, steps // args.probes))
    trainer = ProbedTrainer(model, spec, data, device, watched, set(probe_steps),
                            [lr * m for m in parse_numbers(args.step_sizes, "--step-sizes")],
                            args.monitor_examples)
    result = trainer.run()
    drift = layer_drift(trainer.rows)
    final = result["history"][-1]
    noises = [m for m in model.modules() if isinstance(m, TimeVaryingNoise)]
    for noise in noises:
        noise.eval_noise = False
    clean = trainer.evaluate() if noises else final["test_accuracy"]
    log(f"ics: seed {args.seed} {arch} {NETWORKS[network]}: {result['steps_done']} steps in "
        f"{result['seconds']:.0f} s, train loss {final['train_loss']:.4f}, test accuracy "
        f"{final['test_accuracy']:.4f}")
    middle = watched[len(watched) // 2]
    return dict(history=result["history"], diverged=result["diverged"], clean_accuracy=clean,
                seconds=result["seconds"], lr=lr, probes=trainer.probes,
                drift={name: d.as_dict() for name, d in drift.items()},
                watched_unit=dict(module=middle, unit=0, rows=[
                    {k: r[k] for k in ("step", "p15", "p50", "p85")}
                    for r in trainer.rows if r["module"] == middle and r["unit"] == 0]))


class ProbedTrainer(Trainer):
    """The shared trainer plus: the training accuracy of the mini-batches; at every
    evaluation, the percentiles of the ``watched`` modules' inputs; before the steps
    ``probe_steps``, :func:`gradient_ics` and :func:`landscape_smoothness` on that step's batch
    (neither changes the training: they work on copies)."""

    def __init__(self, model, spec, data, device, watched, probe_steps, step_sizes,
                 monitor_examples):
        super().__init__(model, spec, data.train, data.test, device)
        self.watched, self.probe_steps, self.step_sizes = watched, probe_steps, step_sizes
        self.monitor_x = data.test[0][:monitor_examples].to(self.device)
        weights = (nn.Conv2d, nn.Linear)
        self.layers = [n for n, m in model.named_modules() if isinstance(m, weights)]
        self.rows: list[dict] = []
        self.probes: list[dict] = []
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.seen = 0

    def loss(self, x, y):
        logits = self.net(x)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)
        return nn.functional.cross_entropy(logits, y)

    def train_step(self, x, y):
        step = self.state.step
        if step in self.probe_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.spec.lr_at(step)
            loss_fn = batch_loss(nn.functional.cross_entropy, x, y)
            ics = [r.as_dict() for r in gradient_ics(self.model, loss_fn, self.optimizer)
                   if r.layer in self.layers]
            smooth = landscape_smoothness(self.model, loss_fn, self.step_sizes).as_dict()
            self.probes.append(dict(step=step, ics=ics, smoothness=smooth))
        super().train_step(x, y)

    def record(self):
        super().record()
        point = self.state.history[-1]
        point["train_accuracy"] = float(self.correct) / self.seen if self.seen else None
        self.correct.zero_()
        self.seen = 0
        # the inputs the current weights produce, in training mode (batch statistics, this
        # step's noise), on a copy: the model's buffers and the noise step are not advanced
        probe = copy.deepcopy(self.model).train()
        monitor = ActivationMonitor(probe, self.watched)
        with torch.no_grad(), monitor.record(self.state.step):
            probe(self.monitor_x)
        self.rows += monitor.rows()
