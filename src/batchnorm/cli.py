"""Command line: ``batchnorm demo`` and ``batchnorm reproduce <experiment>``.

Each experiment lives in one module under :mod:`batchnorm.repro` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them,
importing an experiment when it is asked for. A bad argument that a command finds (an
:class:`~batchnorm.repro.common.ArgumentError`, e.g. an ``--out`` folder that cannot be
created, or a checkpoint that cannot be resumed) is printed as one line, and the exit status
is 2, as for the arguments argparse itself rejects.

Every command runs under :func:`batchnorm.repro.interrupt.guard`: the first Ctrl-C (or
SIGTERM) lets the current training step finish, the command saves what it has and says how to
continue, and the exit status is 130 (143 for SIGTERM); a second one stops at once, also with
one line and status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# experiment name -> (module, one-line help)
EXPERIMENTS = {
    "mnist": ("batchnorm.repro.mnist", "Figure 1: MNIST MLP with and without BN (section 4.1)"),
    "inception": ("batchnorm.repro.inception", "Figures 2-3: BN-Inception variants (section 4.2)"),
    "lr-sweep": ("batchnorm.repro.lr_sweep", "Claim 1: learning rates x1..x30 with and without BN"),
    "depth": ("batchnorm.repro.depth", "Claims 4-5: deep sigmoid networks with and without BN"),
    "ics": ("batchnorm.repro.ics", "Mechanism: stability, ICS, smoothness; no BN/BN/noisy BN"),
    "memory": ("batchnorm.repro.memory",
               "In-place activated BN: saved bytes, peak memory and accuracy vs BN + activation"),
    "small-batch": ("batchnorm.repro.small_batch",
                    "Batch Renorm vs BN and Ghost BN: small and non-i.i.d. batches"),
    "ghost": ("batchnorm.repro.large_batch",
              "Ghost BN: large batches with and without ghost batches vs a small batch"),
}
COMMANDS = {
    "demo": ("batchnorm.repro.demo", "Train a small BN model; population stats and folding agree"),
}


def _add(subparsers, name, module_name, help_text):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        parser.set_defaults(_unavailable=f"'{name}' is not available in this version")
        return
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run, _prog=parser.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization (Ioffe & Szegedy, 2015): demos and paper reproductions.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        _add(commands, name, module_name, help_text)
    reproduce = commands.add_parser("reproduce", help="reproduce one of the paper's experiments")
    experiments = reproduce.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, (module_name, help_text) in EXPERIMENTS.items():
        _add(experiments, name, module_name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command's guard: while importing, parsing
        print("\nbatchnorm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from batchnorm import process_group

    try:
        return _run_command(argv)
    finally:
        process_group.leave()  # a torchrun command joined one; leave it before exiting


def _run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"batchnorm: {args._unavailable}", file=sys.stderr)
        return 2
    args._argv = list(sys.argv[1:] if argv is None else argv)  # to say how to resume
    from batchnorm.repro import interrupt
    from batchnorm.repro.common import ArgumentError

    try:
        with interrupt.guard():
            status = int(args._run(args) or 0)
            if interrupt.requested() and status == 0:
                print(f"{args._prog}: stopped by a signal after the work was done (the "
                      "outputs are complete)", file=sys.stderr)
                status = interrupt.exit_status()
            return status
    except ArgumentError as error:
        print(f"{args._prog}: {error}", file=sys.stderr)
        return 2
    except interrupt.Stopped as stop:
        return stop.status
    except KeyboardInterrupt:
        print(f"\n{args._prog}: interrupted; stopped at once (checkpoints already written are "
              "intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
