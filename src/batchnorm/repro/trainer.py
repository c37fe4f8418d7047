"""The training loop every experiment shares.

A :class:`Trainer` is one run: the model, its optimizer (SGD with momentum and weight decay on
weights), the loop state (:class:`TrainState`: step, history, divergence, time, the training
loss summed since the last evaluation) and what acts on them: a training step, evaluation,
the divergence check, checkpoints. :class:`TrainSpec` says what to do: steps, batch size,
learning-rate schedule, how often to evaluate, check and checkpoint.

What the loop does, in order, every step: set the learning rate, train on the next batch; every
``check_every`` steps and at evaluations, stop if the loss or a parameter is not finite; at
evaluations (every ``eval_every`` steps, the steps of ``eval_steps`` and the last step) append
a point to the history; every ``ckpt_every`` steps, save a checkpoint. A run resumed from its
checkpoint gives bitwise the result of an uninterrupted one (data order, dropout masks and
optimizer state are all restored).

Faults: checkpoints are written atomically and read back checked, without unpickling code
(:mod:`batchnorm.repro.checkpoint`: a damaged one falls back to the previous checkpoint, a
tampered one is refused). Ctrl-C or SIGTERM (:mod:`batchnorm.repro.interrupt`) lets the current
step finish, then the run saves its checkpoint and returns with ``interrupted`` set.

An experiment that trains differently overrides one of three methods: :meth:`Trainer.loss`
(the objective of a batch), :meth:`Trainer.evaluate` (what is measured at an evaluation) or
:meth:`Trainer.batches` (the order of the training examples).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from batchnorm.repro import checkpoint, interrupt
from batchnorm.repro.common import (
    ArgumentError,
    flush_denormals,
    is_main_process,
    log,
    shard,
    world_size,
)
from batchnorm.repro.image_data import IndexBatches, image_batches, num_examples


@dataclass
class TrainSpec:
    """Everything a :class:`Trainer` needs besides the model and data.

    The learning rate at step ``t`` (0-based) is ``lr * decay_factor ** (t // decay_every)``
    (constant if ``decay_every == 0``). Weight decay applies to weights of rank >= 2
    (convolutions, linear layers), not to biases or BN's gamma/beta.
    """

    steps: int
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_every: int = 0
    decay_factor: float = 0.96
    eval_every: int = 100
    eval_steps: Collection[int] = ()  # evaluated too (besides every eval_every and the last)
    check_every: int = 10  # divergence check (and the loss shown) every this many steps
    eval_batch_size: int = 500
    seed: int = 0
    checkpoint: str | None = None  # file; written every ckpt_every steps and when stopping
    ckpt_every: int = 0
    resume: bool = False
    amp: bool = False  # bfloat16 autocast (CUDA)
    channels_last: bool = False
    flush_denormals: bool = True  # on the CPU (see common.flush_denormals)
    workers: int = 0
    progress: bool = True
    log_evaluations: bool = True  # a line per evaluation (besides the progress bar)
    label: str = "train"
    stop_at: int = 0  # pretend to be killed after this step (tests of --resume)
    meta: dict = field(default_factory=dict)  # stored in the checkpoint, must match on resume

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "check_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainSpec: {name} must be a positive int, got {value!r}")
        for name in ("decay_every", "ckpt_every", "stop_at", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainSpec: {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainSpec: lr must be > 0, got {self.lr!r}")
        self.eval_steps = frozenset(self.eval_steps)  # looked up every step

    def lr_at(self, step: int) -> float:
        if not self.decay_every:
            return self.lr
        return self.lr * self.decay_factor ** (step // self.decay_every)

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.steps or step in self.eval_steps

    def fingerprint(self) -> dict:
        """What must be equal for a checkpoint to be resumed (``steps`` may grow)."""
        keep = ("batch_size", "lr", "momentum", "weight_decay", "decay_every", "decay_factor",
                "seed")
        return {k: getattr(self, k) for k in keep} | {"meta": self.meta}


@dataclass
class TrainState:
    """Where a run stands; what a checkpoint stores besides the model, optimizer and RNG."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    diverged: dict | None = None
    seconds: float = 0.0
    loss_sum: torch.Tensor | None = None  # training loss summed since the last evaluation
    loss_count: int = 0


class Trainer:
    """One training run of ``model`` with SGD + momentum on cross-entropy; :meth:`run` it.

    ``train_data``/``test_data`` are what :mod:`batchnorm.repro.image_data` loads. Under
    ``torchrun`` (several processes) the model is wrapped in DDP, each process trains on its
    shard of every global batch and evaluation is sharded.
    """

    def __init__(self, model: nn.Module, spec: TrainSpec, train_data=None, test_data=None,
                 device: torch.device | str = "cpu",
                 order: Callable[[int], Iterable] | None = None):
        self.spec = spec
        self.order = order
        self.device = device = torch.device(device)
        self.train_data, self.test_data = train_data, test_data
        self.model = model.to(device)
        if spec.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = _sgd(model, spec)
        acc_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.state = TrainState(loss_sum=torch.zeros((), dtype=acc_dtype, device=device))
        self.checkpoint = Path(spec.checkpoint) if spec.checkpoint else None
        if self.checkpoint is not None:  # now, not at the first save
            checkpoint.check_plain(spec.fingerprint(), "TrainSpec (fingerprint)")
        self.net = model  # what the training step calls: the model, or DDP around it
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp)
        self.bar = None
        self._postfix: dict[str, str] = {}
        self._clock = time.perf_counter()
        self._keep_previous = True  # the next save keeps the checkpoint it replaces
        self._saved_step = -1

    # ---------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train to ``spec.steps`` (or divergence, or ``stop_at``, or a stop signal: Ctrl-C,
        SIGTERM). Returns ``{"history": [{step, lr, train_loss, test_accuracy, seconds}],
        "diverged": None | {...}, "steps_done", "complete", "interrupted", "stopped_by": None |
        "stop_at" | "SIGINT" | "SIGTERM", "seconds"}``."""
        numerics = (flush_denormals() if self.spec.flush_denormals and self.device.type == "cpu"
                    else contextlib.nullcontext())
        with numerics, interrupt.guard():
            if self.spec.resume:
                self.resume()
            if world_size() > 1:
                self.net = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return self._loop()

    def _loop(self) -> dict:
        spec, state = self.spec, self.state
        self._clock = time.perf_counter()
        self.bar = tqdm(total=spec.steps, initial=state.step, desc=spec.label, unit="step",
                        dynamic_ncols=True, mininterval=1.0, leave=False,
                        disable=not (spec.progress and is_main_process()))
        if not state.history:
            self.record()
        batches = self.batches(state.step)
        stopped_by = None
        self.model.train()
        while state.step < spec.steps and state.diverged is None:
            self.train_step(*next(batches))
            step = state.step
            self.bar.update(1)
            interrupt.pause_point(step)
            evaluation = spec.evaluates_at(step)
            check = evaluation or step % spec.check_every == 0 or step == spec.stop_at
            if check and self.check_divergence():
                break
            if evaluation:
                self.record()
            if step == spec.stop_at:
                stopped_by = "stop_at"
            elif step < spec.steps and self._stop_requested(check):
                stopped_by = signal.Signals(interrupt.exit_status() - 128).name
            if spec.ckpt_every and step % spec.ckpt_every == 0 or stopped_by:
                self.save()
            if stopped_by:
                log(f"{spec.label}: stopped at step {step}/{spec.steps}"
                    + (f", checkpoint {self.checkpoint}" if self.checkpoint else ""), self.bar)
                break
        self.bar.close()
        if stopped_by:  # saved already
            self._tick()
        else:
            self.save()
        return dict(history=state.history, diverged=state.diverged, steps_done=state.step,
                    complete=state.step >= spec.steps or state.diverged is not None,
                    interrupted=stopped_by is not None, stopped_by=stopped_by,
                    seconds=round(state.seconds, 2))

    def _stop_requested(self, check: bool) -> bool:
        """Whether a signal asked to stop (:mod:`~batchnorm.repro.interrupt`). With several
        processes they agree at checks only (a collective, at the same steps on all)."""
        if world_size() == 1:
            return interrupt.requested()
        return check and interrupt.agreed(self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One SGD step on the batch ``(x, y)`` at the scheduled learning rate."""
        state = self.state
        lr = self.spec.lr_at(state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        state.loss_sum += loss.detach()  # no sync: read only at checks
        state.loss_count += 1
        state.step += 1

    # ---------------------------------------------------------------- what experiments vary

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective of one (local) batch: mean cross-entropy."""
        return nn.functional.cross_entropy(self.net(x), y)

    def evaluate(self) -> float:
        """Top-1 test accuracy of the model in eval mode (BN: its moving averages)."""
        return evaluate(self.model, self.test_data, self.device, self.spec)

    def batches(self, start: int):
        """``(x, y)`` for step ``start`` on: :class:`~batchnorm.repro.image_data.IndexBatches`
        over the training data (a function of the step alone), or ``order(start)`` when the
        trainer was given an ``order`` (e.g. :class:`~batchnorm.repro.image_data.ClassBatches`;
        it must be a function of the step alone too, for ``--resume``)."""
        spec = self.spec
        order = (self.order(start) if self.order is not None else
                 IndexBatches(num_examples(self.train_data), spec.batch_size, spec.seed, start))
        return image_batches(self.train_data, order, self.device, spec.channels_last,
                             spec.workers)

    # ------------------------------------------------------------------- evaluation, checks

    def record(self) -> None:
        """Evaluate, and append the point of this step to the history: the learning rate of
        the last step, the mean training loss since the last point, the test accuracy."""
        state, spec, step = self.state, self.spec, self.state.step
        accuracy = self.evaluate()
        count = state.loss_count
        loss_sum = state.loss_sum.clone()
        if world_size() > 1:  # every process's shards: the loss on the global batches
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size()
        train_loss = float(loss_sum) / count if count else None
        lr = spec.lr_at(max(step - 1, 0))
        state.history.append(dict(step=step, lr=lr, train_loss=train_loss,
                                  test_accuracy=accuracy,
                                  seconds=round(state.seconds + time.perf_counter()
                                                - self._clock, 2)))
        state.loss_sum.zero_()
        state.loss_count = 0
        self._show(test_acc=f"{accuracy:.4f}")
        if spec.log_evaluations:
            loss_text = "-" if train_loss is None else f"{train_loss:.4f}"
            log(f"{spec.label}: step {step}/{spec.steps}  lr {lr:.4g}  train loss {loss_text}  "
                f"test accuracy {accuracy:.4f}", self.bar)

    def check_divergence(self) -> bool:
        """Record divergence (a non-finite loss or parameter) in the state; whether it
        happened."""
        state = self.state
        state.diverged = check_divergence(self.model, state.loss_sum, state.step)
        if state.diverged is not None:
            log(f"{self.spec.label}: DIVERGED at step {state.step}: "
                f"{state.diverged['reason']}", self.bar)
            return True
        self._show(loss=f"{float(state.loss_sum) / state.loss_count:.4f}")
        return False

    def _show(self, **values: str) -> None:
        self._postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self._postfix, refresh=False)

    # --------------------------------------------------------------------------- checkpoints

    def _tick(self) -> None:
        """Add the time since the last tick to ``state.seconds``."""
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now

    def save(self) -> None:
        """Write the checkpoint (main process; atomically, the previous one kept: see
        :func:`batchnorm.repro.checkpoint.save`), if the spec names one."""
        self._tick()
        if self.checkpoint is None or not is_main_process():
            return
        payload = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                       state=dict(vars(self.state)), fingerprint=self.spec.fingerprint(),
                       rng=torch.get_rng_state(),
                       cuda_rng=(torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                 else None))
        # the previous checkpoint is one of an earlier step (the last save rewrites its own)
        checkpoint.save(payload, self.checkpoint, keep_previous=self._keep_previous and (
            self.state.step != self._saved_step))
        self._keep_previous, self._saved_step = True, self.state.step

    def resume(self) -> None:
        """Continue from the checkpoint, if there is one (it must come from the same
        configuration: :meth:`TrainSpec.fingerprint`). A damaged checkpoint falls back to the
        previous one; one that cannot be trusted, or none good, is a
        :class:`~batchnorm.repro.checkpoint.CheckpointError` (one line, exit status 2)."""
        path, label = self.checkpoint, self.spec.label
        found = None if path is None else checkpoint.load_for_resume(
            path, self.device, log=lambda line: log(f"{label}: {line}"))
        if found is None:
            log(f"{label}: no checkpoint to resume from, starting at step 0")
            return
        payload, path, fell_back = found
        # a damaged current checkpoint is overwritten by the next save, not kept as previous
        self._keep_previous = not (fell_back and self.checkpoint.exists())
        if payload["fingerprint"] != self.spec.fingerprint():
            raise ArgumentError(
                f"--resume: checkpoint {path} was written by a different configuration:\n"
                f"  checkpoint: {payload['fingerprint']}\n  this run:   "
                f"{self.spec.fingerprint()}\n"
                "use another --out (or --ckpt-dir) or delete the checkpoint "
                f"({self.checkpoint}, and {checkpoint.previous(self.checkpoint).name} beside it)")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.state = TrainState(**payload["state"])
            self.state.loss_sum = self.state.loss_sum.to(self.device)
            torch.set_rng_state(payload["rng"].cpu())
            if payload.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
            text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise checkpoint.CheckpointError(
                f"--resume: checkpoint {path} does not fit this run ({text}): use another "
                "--out (or --ckpt-dir) or delete it") from None
        self._saved_step = -1 if fell_back else self.state.step
        log(f"{label}: resumed from {path} at step {self.state.step}")


def train(model: nn.Module, train_data, test_data, spec: TrainSpec,
          device: torch.device | str = "cpu", order: Callable[[int], Iterable] | None = None
          ) -> dict:
    """``Trainer(model, spec, train_data, test_data, device, order).run()``: see
    :class:`Trainer`."""
    return Trainer(model, spec, train_data, test_data, device, order).run()


def evaluate(model: nn.Module, data, device: torch.device, spec: TrainSpec) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``data``; sharded over the processes."""
    was_training = model.training
    model.eval()
    n = num_examples(data)
    order = torch.arange(n)
    index_batches = [shard(order[i : i + spec.eval_batch_size]).tolist()
                     for i in range(0, n, spec.eval_batch_size)]
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp):
        for x, y in image_batches(data, index_batches, device, spec.channels_last, spec.workers):
            counts[0] += (model(x).argmax(1) == y).sum()
            counts[1] += len(y)
    if world_size() > 1:
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1])


def check_divergence(model: nn.Module, loss_sum: torch.Tensor, step: int) -> dict | None:
    """None while the loss (summed since the last evaluation) and every parameter are finite;
    else a record of what blew up."""
    params = [p.detach() for p in model.parameters()]
    finite = torch.stack([torch.isfinite(loss_sum)] + [torch.isfinite(p).all() for p in params])
    ok = finite.all().float()
    if world_size() > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if bool(ok):
        return None
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in params)
    infinite = sum(int(torch.isinf(p).sum()) for p in params)
    total = sum(p.numel() for p in params)
    loss = float(loss_sum)
    reason = f"non-finite training loss ({loss})" if not math.isfinite(loss) else (
        "non-finite parameters")
    return dict(step=step, reason=reason, nonfinite_parameters=nonfinite,
                infinite_parameters=infinite, total_parameters=total)


def _sgd(model: nn.Module, spec: TrainSpec) -> torch.optim.SGD:
    """SGD + momentum; weight decay on weights of rank >= 2 only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, momentum=spec.momentum,
    )


def synchronized(model: nn.Module) -> nn.Module:
    """BN layers -> synchronized BN (statistics over the global batch, as on one process), for
    data-parallel training; raises if the conversion lost the BN layers' fused activations (the
    network would silently become linear)."""
    import batchnorm

    before = [getattr(m, "activation", None) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model = batchnorm.convert(model, sync=True)
    after = [getattr(m, "activation", None) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if before != after:
        raise RuntimeError("batchnorm.convert(sync=True) did not keep the BN layers' fused "
                           "activations; the synchronized network would be linear")
    return model
