"""Runs that cannot be lost: an existing run is never overwritten by accident, a bad --out fails before any
work, the first checkpoint comes by wall time, a full disk keeps the last checkpoint, kill -9 then --resume."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm import run_dir
from ldm.checkpoint import safe_load
from ldm.cli import main
from ldm.train import Trainer

# A UNet small enough that a step takes milliseconds, as `ldm train` options.
TINY = ["--unet.channels", "8", "--unet.channel-mult", "1,2", "--unet.num-res-blocks", "1", "--unet.attention",
        "false,false", "--unet.mid-attention", "false", "--unet.norm-groups", "4", "--batch-size", "8",
        "--sample-n", "0", "--sample-every", "0", "--mixed-precision", "no"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm.cli", *args], capture_output=True, text=True, timeout=300, **kwargs)


def trained(tiny_config, mnist_small, out: Path, steps: int = 2) -> bytes:
    Trainer(tiny_config.with_(steps=steps, sample_n=0), out, dataset=mnist_small, progress=False).train()
    return (out / "checkpoint.pt").read_bytes()


def test_an_existing_run_is_refused_and_left_byte_identical(tiny_config, mnist_small, tmp_path):
    before = trained(tiny_config, mnist_small, tmp_path)
    again = Trainer(tiny_config.with_(steps=4), tmp_path, dataset=mnist_small, progress=False)
    with pytest.raises(ValueError, match=r"already holds a run .*--resume.*--overwrite"):
        again.train()
    assert again.step == 0 and (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ValueError, match="give one of them"):
        again.fit(resume=True, overwrite=True)


def test_overwrite_keeps_the_old_checkpoint_until_the_first_save(tiny_config, mnist_small, tmp_path):
    before = trained(tiny_config, mnist_small, tmp_path)
    fresh = Trainer(tiny_config.with_(steps=3, sample_n=0), tmp_path, dataset=mnist_small, progress=False)
    fresh.claim(overwrite=True)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / run_dir.BACKUP).read_bytes() == before  # a crash now loses nothing
    fresh.train()
    assert not (tmp_path / run_dir.BACKUP).exists()
    assert safe_load(tmp_path / "checkpoint.pt")["step"] == 3


def test_config_is_written_before_the_first_step(tiny_config, mnist_small, tmp_path):
    out = tmp_path / "new" / "run"
    trainer = Trainer(tiny_config, out, dataset=mnist_small, progress=False)

    def crash():
        assert (out / "config.json").is_file()  # a run killed at once still says what it was
        raise RuntimeError("killed")

    trainer.train_step = crash
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train()
    assert not (out / "checkpoint.pt").exists()


def test_first_checkpoint_by_wall_time(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=3, checkpoint_every=1000, checkpoint_minutes=1e-9, sample_n=0),
                      tmp_path, dataset=mnist_small, progress=False)
    saved = []
    save = trainer.save
    trainer.save = lambda: (saved.append(trainer.step), save())
    trainer.train()
    assert saved == [1, 2, 3]  # one per step by time, and no second copy of the last one


def test_resuming_a_finished_run_changes_nothing(tiny_config, mnist_small, tmp_path):
    before = trained(tiny_config, mnist_small, tmp_path, steps=2)
    (tmp_path / "samples.png").unlink(missing_ok=True)
    again = Trainer(tiny_config.with_(steps=2), tmp_path, dataset=mnist_small, progress=False).fit(resume=True)
    assert again.step == 2 and (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "samples.png").exists()  # nothing trained, nothing re-sampled


@pytest.mark.parametrize("budget", [["--max-minutes", "0"], ["--max-minutes", "-1"], ["--steps", "0"]])
def test_empty_budgets_are_refused(budget, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), *budget])
    assert "must be" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["a file", "under /proc"])
def test_a_bad_out_fails_before_any_data_loads(where, tmp_path, capsys):
    out = tmp_path / "file.txt" if where == "a file" else Path("/proc/ldm-test-run")
    if where == "a file":
        out.write_text("not a run")
    missing = tmp_path / "no-such-dataset"  # loading it would fail with another error: --out must be checked first
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--steps", "1", "--dataset", str(missing)])
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "no-such-dataset" not in err
    assert len(err.strip().splitlines()) == 1


def test_too_little_free_space_is_refused_before_the_first_step(tiny_config, mnist_small, tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    trainer = Trainer(tiny_config, tmp_path, dataset=mnist_small, progress=False)
    with pytest.raises(ValueError, match="not enough free space"):
        trainer.train()
    assert trainer.step == 0


class FullDisk:
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    main(["train", "--out", out, "--steps", "2", *TINY])
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    fdopen = os.fdopen
    monkeypatch.setattr("ldm.checkpoint.os.fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode), room=4096))
    with pytest.raises(SystemExit):
        main(["train", "--out", out, "--steps", "4", "--resume", *TINY])
    messages = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("ldm")]
    assert len(messages) == 1  # one line, no traceback (the rest of stderr is the progress bar)
    assert messages[0].startswith("ldm train: error: disk full") and "checkpoint.pt is unchanged" in messages[0]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no half-written files left behind


def test_kill_9_then_resume_continues_from_the_time_based_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ldm.cli", "train", "--out", str(out), "--max-minutes", "10", *TINY,
               "--checkpoint-minutes", "0.005", "--checkpoint-every", "100000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waited = time.monotonic()
        while not (out / "checkpoint.pt").exists():
            assert process.poll() is None and time.monotonic() - waited < 240, "no checkpoint by wall time"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = safe_load(out / "checkpoint.pt")
    assert killed["step"] >= 1
    before = (out / "checkpoint.pt").read_bytes()

    refused = cli(*command[3:])
    assert refused.returncode == 1 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "checkpoint.pt").read_bytes() == before

    resumed = cli("train", "--out", str(out), "--resume", "--steps", str(killed["step"] + 2), *TINY)
    assert resumed.returncode == 0, resumed.stderr
    state = safe_load(out / "checkpoint.pt")
    assert state["step"] == killed["step"] + 2
    assert state["losses"][: killed["step"]] == killed["losses"]  # continued, not restarted
    assert not torch.equal(state["model"]["conv_in.weight"], killed["model"]["conv_in.weight"])
