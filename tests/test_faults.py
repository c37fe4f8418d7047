"""Faults and untrusted files: what survives what.

- a checkpoint carrying a pickled object is refused, and the object never runs;
- a damaged checkpoint (cut short, a byte altered) falls back to the previous one, or is one
  line and exit status 2 when there is none; a full disk while saving keeps the last one;
- Ctrl-C (SIGINT) lets the step finish, saves checkpoint and history, says how to resume and
  exits with 130; the resumed run equals an uninterrupted one; a second Ctrl-C stops at once;
  commands without checkpoints write their results so far; SIGKILL loses nothing saved;
- an output folder that cannot be created is one line and exit status 2, for every command.

The subprocess tests stop a run at a known step: ``BATCHNORM_TEST_PAUSE_AT`` makes it wait
after that step (see :func:`batchnorm.repro.interrupt.pause_point`) until the test signals it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_data import FASHION_DIR, IDX_NAMES, make_image_folder, require_files

import batchnorm
from batchnorm.cli import main
from batchnorm.repro.image_data import load_data
from batchnorm.repro.trainer import Trainer, TrainSpec, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "synthetic", "--width", "0.05", "--batch-size", "8", "--no-progress",
        "--threads", "1"]
SWEEP = ["--dataset", "synthetic", "--train-subset", "0", "--test-subset", "0",
         "--batch-size", "16", "--no-progress", "--steps", "6", "--eval-every", "2"]


def inception(out: Path, *extra: str) -> list[str]:
    """A tiny BN-x5 run: 6 steps, evaluated every 2, checkpoints every 2."""
    return ["reproduce", "inception", "--variant", "bn-x5", *TINY, "--steps", "6",
            "--eval-every", "2", "--ckpt-every", "2", "--out", str(out), *extra]


def record(out: Path) -> dict:
    return json.loads((out / "bn-x5" / "history.json").read_text())


def history(out: Path) -> list[dict]:
    """The run's history without the timings."""
    return [{k: v for k, v in p.items() if k != "seconds"} for p in record(out)["history"]]


def checkpoint_of(out: Path) -> Path:
    return out / "checkpoints" / "bn-x5.pt"


def step_in(path: Path) -> int:
    return torch.load(path, weights_only=True)["state"]["step"]


def tiny_model():
    torch.manual_seed(0)
    from batchnorm.models.inception import InceptionBN

    return InceptionBN(4, 1, bn=True, dropout=0.3, stem="small", width=0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The history of the tiny run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    assert main(inception(out)) == 0
    return history(out)


# ------------------------------------------------------------- 1. untrusted checkpoints


class RunsCode:
    """Unpickling this runs a shell command (as a malicious checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_checkpoint_carrying_a_pickled_object_is_refused_unrun(tmp_path, capsys):
    argv = inception(tmp_path, "--stop-at", "2")
    assert main(argv) == 0
    path = checkpoint_of(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["note"] = RunsCode(tmp_path / "pwned")
    torch.save(payload, path)
    capsys.readouterr()
    code = main([*argv, "--resume"])
    assert not (tmp_path / "pwned").exists(), "loading the checkpoint ran its code"
    assert code == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} holds a pickled Python object (posix.system)" in err
    assert "refusing it" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_the_first_format_still_resumes(tmp_path, reference):
    """Checkpoints written before the format was numbered (no "format" key) load as before."""
    argv = inception(tmp_path)
    assert main([*argv, "--stop-at", "3"]) == 0
    path = checkpoint_of(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert payload.pop("format") == 2
    torch.save(payload, path)
    assert main([*argv, "--resume"]) == 0
    assert history(tmp_path) == reference


def test_what_loading_would_refuse_is_not_saved_either(tmp_path):
    """A NumPy value (or any object) in a checkpoint is a TypeError when the run starts, not a
    refusal to resume hours later."""
    import numpy as np

    from batchnorm.repro import checkpoint

    with pytest.raises(TypeError, match=r"\['meta'\]\['scale'\] is a numpy.float64"):
        Trainer(tiny_model(), TrainSpec(steps=1, checkpoint=str(tmp_path / "c.pt"),
                                        meta=dict(scale=np.float64(0.5))))
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\[1\] is a numpy.ndarray"):
        checkpoint.save(dict(rng=np.random.get_state()), tmp_path / "c.pt")  # noqa: NPY002
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------- 2. damaged checkpoints


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    """Alter one byte inside the largest tensor's data (torch.load alone does not notice)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    offset = info.header_offset
    name_length = int.from_bytes(data[offset + 26 : offset + 28], "little")
    extra_length = int.from_bytes(data[offset + 28 : offset + 30], "little")
    data[offset + 30 + name_length + extra_length + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, reference,
                                                               damage):
    argv = inception(tmp_path)
    assert main([*argv, "--stop-at", "4"]) == 0  # checkpoints at steps 2 (previous) and 4
    path = checkpoint_of(tmp_path)
    assert step_in(path) == 4 and step_in(path.with_name("bn-x5.pt.prev")) == 2
    damage(path)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {path} is damaged" in out
    assert "falling back to the previous checkpoint" in out and "at step 2" in out
    assert history(tmp_path) == reference
    assert step_in(path) == 6 and step_in(path.with_name("bn-x5.pt.prev")) == 4


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_a_damaged_checkpoint_and_no_previous_one_is_one_line(tmp_path, capsys, damage):
    argv = inception(tmp_path)
    assert main([*argv, "--stop-at", "2"]) == 0  # one checkpoint only
    path = checkpoint_of(tmp_path)
    damage(path)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: checkpoint {path} is damaged (cut short or altered" in err
    assert "delete it to start this run over" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                            reference):
    real_save, calls = torch.save, []

    def disk_fills_up(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of step 4
            with contextlib.ExitStack() as stack:
                if isinstance(handle, (str, os.PathLike)):
                    handle = stack.enter_context(open(handle, "wb"))
                handle.write(b"PK\x03\x04 and then the disk was full")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    argv = inception(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    path = checkpoint_of(tmp_path)
    assert f"cannot write checkpoint {path}: No space left on device" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["bn-x5.pt"]  # no partial file left
    assert step_in(path) == 2
    assert main([*argv, "--resume"]) == 0
    assert history(tmp_path) == reference


# ------------------------------------------------------------- 3. Ctrl-C, SIGTERM, SIGKILL


def test_the_trainer_finishes_the_step_a_signal_arrives_in(tmp_path):
    """SIGINT during step 3 (inside the loss): the step completes, the checkpoint is saved,
    the run returns; the previous handler is back; resuming equals not stopping."""
    data = load_data("synthetic")

    class SignalledInStep3(Trainer):
        def loss(self, x, y):
            if self.state.step == 2:
                signal.raise_signal(signal.SIGINT)
            return super().loss(x, y)

    def spec(name, resume=False):
        return TrainSpec(steps=6, batch_size=8, lr=0.05, eval_every=4, check_every=2,
                         checkpoint=str(tmp_path / name), resume=resume, progress=False,
                         eval_batch_size=100)

    before = signal.getsignal(signal.SIGINT)
    try:
        stopped = SignalledInStep3(tiny_model(), spec("a.pt"), data.train, data.test).run()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt in the middle of a step")
    assert signal.getsignal(signal.SIGINT) is before
    assert stopped["stopped_by"] == "SIGINT" and stopped["interrupted"]
    assert stopped["steps_done"] == 3 and not stopped["complete"]
    assert step_in(tmp_path / "a.pt") == 3
    resumed_model = tiny_model()
    resumed = train(resumed_model, data.train, data.test, spec("a.pt", resume=True))
    reference_model = tiny_model()
    expected = train(reference_model, data.train, data.test, spec("b.pt"))
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in expected["history"]]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in resumed["history"]] == strip
    for key, value in reference_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


class Run:
    """``python -m batchnorm ARGV`` (or ``launcher ARGV``) in a session of its own, as a
    terminal's foreground job (a signal to the group reaches its data-loading workers too),
    made to wait after step ``pause_at`` until the test signals it."""

    def __init__(self, tmp_path: Path, argv: list[str], pause_at: int, hold: bool = False,
                 launcher: list[str] | None = None):
        self.pause = tmp_path / "paused"
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        source = str(Path(batchnorm.__file__).parents[1])
        self.env = dict(os.environ, OMP_NUM_THREADS="1", BATCHNORM_TEST_PAUSE_AT=str(pause_at),
                        BATCHNORM_TEST_PAUSE_FILE=str(self.pause),
                        PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
        if hold:
            self.env["BATCHNORM_TEST_PAUSE_HOLD"] = "1"
        command = [*(launcher or [sys.executable, "-m", "batchnorm"]), *argv]
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=self.env,
                                            cwd=tmp_path, start_new_session=True)

    def wait_for(self, condition, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def signal(self, number: int) -> None:
        """Send ``number`` to the process group once the run waits at its pause."""
        self.wait_for(self.pause.exists)
        if self.process.poll() is None:
            os.killpg(self.process.pid, number)

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        return code, self.stdout.read_text(), self.stderr.read_text()


def resume_command(err: str) -> list[str]:
    """The command the message says to resume with, as ``main``'s arguments."""
    line = next(line for line in err.splitlines() if "resume with: " in line)
    words = shlex.split(line.split("resume with: ", 1)[1])
    assert words[0] == "batchnorm"
    return words[1:]


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_says_how_to_resume_and_resuming_loses_nothing(tmp_path, reference,
                                                                   number):
    """Ctrl-C (SIGINT), or SIGTERM as a scheduler sends it before killing a job."""
    out = tmp_path / "out"
    run = Run(tmp_path, inception(out), pause_at=3)
    run.signal(number)
    code, _, err = run.finish()
    assert code == 128 + number, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    name = signal.Signals(number).name
    assert f"{name}: stopped at step 3 of bn-x5; resume with: batchnorm reproduce inception" in err
    partial = record(out)
    assert partial["steps_done"] == 3 and not partial["complete"]
    assert partial["stopped_by"] == name
    assert [p["step"] for p in partial["history"]] == [0, 2]
    assert step_in(checkpoint_of(out)) == 3
    argv = resume_command(err)
    assert argv == [*inception(out), "--resume"]
    assert main(argv) == 0
    assert history(out) == reference


def test_ctrl_c_with_data_loading_workers(tmp_path, rng):
    """Image folders read by worker processes: Ctrl-C reaches them too (the terminal signals
    the whole group); they ignore it and the run stops as without them."""
    make_image_folder(tmp_path / "data" / "train", rng, counts=(4, 4))
    make_image_folder(tmp_path / "data" / "val", rng, counts=(2, 2))
    out = tmp_path / "out"
    argv = ["reproduce", "inception", "--variant", "bn-x5", "--width", "0.05", "--no-progress",
            "--threads", "1", "--dataset", f"imagefolder:{tmp_path / 'data'}",
            "--image-size", "16", "--workers", "1", "--batch-size", "4", "--steps", "6",
            "--eval-every", "2", "--ckpt-every", "2", "--out", str(out)]
    run = Run(tmp_path, argv, pause_at=3)
    run.signal(signal.SIGINT)
    code, _, err = run.finish()
    assert code == 130, err
    assert "Traceback" not in err and "stopped at step 3 of bn-x5; resume with:" in err
    assert record(out)["steps_done"] == 3 and step_in(checkpoint_of(out)) == 3
    assert main(resume_command(err)) == 0
    assert record(out)["complete"] and [p["step"] for p in record(out)["history"]] == [
        0, 2, 4, 6]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out = tmp_path / "out"
    run = Run(tmp_path, inception(out), pause_at=3, hold=True)
    run.signal(signal.SIGINT)
    run.wait_for(lambda: "stopping after the current step" in run.stderr.read_text())
    os.killpg(run.process.pid, signal.SIGINT)
    code, _, err = run.finish()
    assert code == 130, err
    assert "interrupted; stopped at once" in err and "Traceback" not in err
    assert step_in(checkpoint_of(out)) == 2  # the last checkpoint is intact
    assert [p.name for p in checkpoint_of(out).parent.iterdir()] == ["bn-x5.pt"]


def test_sigkill_after_a_checkpoint_loses_nothing(tmp_path, reference):
    out = tmp_path / "out"
    run = Run(tmp_path, inception(out), pause_at=3)
    run.signal(signal.SIGKILL)
    code, _, _ = run.finish()
    assert code == -signal.SIGKILL
    assert step_in(checkpoint_of(out)) == 2
    assert main([*inception(out), "--resume"]) == 0
    assert history(out) == reference


def fashion_mnist() -> list[str]:
    folder = require_files(FASHION_DIR, "Fashion-MNIST", "BATCHNORM_TEST_FASHION_DIR (or "
                           "apt-get install dataset-fashion-mnist)", IDX_NAMES)
    return ["--dataset", "fashion-mnist", "--data-dir", str(folder), "--no-download"]


def short_run(command: str) -> list[str]:
    """``batchnorm reproduce COMMAND``'s arguments for a run of 6 steps (but ``--out``)."""
    if command == "inception":
        return ["inception", *TINY, "--steps", "6"]
    if command == "mnist":
        return ["mnist", *fashion_mnist(), "--steps", "6", "--eval-every", "2",
                "--no-progress"]
    values = {"lr-sweep": ["--multipliers", "1,5"], "depth": ["--depths", "2,3"]}[command]
    return [command, *SWEEP, *values]


@pytest.mark.parametrize("command", ["lr-sweep", "depth", "mnist"])
def test_ctrl_c_in_a_command_without_checkpoints_writes_the_results_so_far(tmp_path, command):
    out = tmp_path / "out"
    argv = ["reproduce", *short_run(command), "--out", str(out)]
    run = Run(tmp_path, argv, pause_at=3)
    run.signal(signal.SIGINT)
    code, _, err = run.finish()
    assert code == 130, err
    assert "Traceback" not in err
    first = "without BN" if command == "mnist" else "no BN"
    assert f"SIGINT: stopped at step 3 of {first}" in err
    assert (f"results so far in {out / 'interrupted.json'}; this command has no checkpoints: "
            f"`{shlex.join(['batchnorm', *argv])}` starts over") in err
    partial = json.loads((out / "interrupted.json").read_text())
    assert partial["stopped"].startswith("SIGINT at step 3 of")
    if command == "mnist":
        assert [p["step"] for p in partial["histories"]["no_bn"]] == [0, 2]
    else:
        [only] = partial["runs"]
        assert only["steps_done"] == 3 and [p["step"] for p in only["history"]] == [0, 2]


def test_ctrl_c_in_the_demo(tmp_path):
    run = Run(tmp_path, ["demo", "--steps", "50"], pause_at=3)
    run.signal(signal.SIGINT)
    code, out, err = run.finish()
    assert code == 130, err
    assert "step     3  training loss" in out and "test accuracy" not in out
    assert ("batchnorm demo: SIGINT: stopped at step 3 of 50; this command has no checkpoints: "
            "`batchnorm demo --steps 50` starts over") in err
    assert "Traceback" not in err


@pytest.mark.distributed
@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    """torchrun passes the signal on to its workers; they agree on the step (at the next
    check: an evaluation here), save, and the resumed run completes."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to the interpreter")
    out = tmp_path / "out"
    launcher = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "batchnorm"]
    run = Run(tmp_path, inception(out), pause_at=3, launcher=launcher)
    run.signal(signal.SIGINT)
    _, _, err = run.finish()
    assert "stopped at step 4 of bn-x5; resume with: batchnorm reproduce inception" in err
    assert "(under the same torchrun command)" in err
    partial = record(out)
    assert partial["steps_done"] == 4 and partial["stopped_by"] == "SIGINT"
    assert step_in(checkpoint_of(out)) == 4
    done = subprocess.run([*launcher, *inception(out), "--resume"], capture_output=True,
                          text=True, timeout=300, env=run.env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert record(out)["complete"] and [p["step"] for p in record(out)["history"]] == [
        0, 2, 4, 6]


# ------------------------------------------------------------- an output folder it cannot create


def unwritable(tmp_path: Path, where: str) -> Path:
    if where == "under a file":
        (tmp_path / "a-file").write_text("not a folder")
        return tmp_path / "a-file" / "out"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return folder / "out"
    (folder / "probe").rmdir()  # root writes anywhere: sysfs refuses new folders even to it
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no read-only place for this user")
    return Path("/sys/kernel/batchnorm-test-out")


@pytest.mark.parametrize("where", ["under a file", "read-only"])
@pytest.mark.parametrize("command", ["inception", "lr-sweep", "depth", "mnist"])
def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys, command, where):
    out = unwritable(tmp_path, where)
    argv = short_run(command)
    assert main(["reproduce", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"batchnorm reproduce {command}: --out {out}: cannot create or write the folder" in (
        err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    ckpt_dir = unwritable(tmp_path, "under a file")
    assert main(inception(tmp_path / "out", "--ckpt-dir", str(ckpt_dir))) == 2
    err = capsys.readouterr().err
    assert f"--ckpt-dir {ckpt_dir}: cannot create or write the folder" in err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "1"], "--batch-size must be >= 2, got 1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
])
def test_bad_demo_arguments_are_one_line(capsys, extra, message):
    assert main(["demo", *extra]) == 2
    err = capsys.readouterr().err
    assert f"batchnorm demo: {message}" in err and "Traceback" not in err
