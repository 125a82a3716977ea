"""Two CPU processes with torch.distributed (gloo): started by mp.spawn as torchrun would, and by torchrun itself."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.checkpoint import safe_load
from ldm.data import ImageDataset, load_dataset
from ldm.train import TrainConfig, Trainer
from ldm.unet import UNetConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = load_dataset("mnist-bundled")
    data = ImageDataset(data.images[:256].clone(), data.labels[:256].clone(), 10)
    unet = UNetConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention=(False, False), mid_attention=False,
                      norm_groups=4)
    config = TrainConfig(unet=unet, sample_n=0).with_(batch_size=16, steps=4, warmup_steps=1, sample_every=0,
                                                      checkpoint_every=100)
    trainer = Trainer(config, out, dataset=data, progress=False)
    initial = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().clone()
    trainer.train()
    final = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()
    torch.save({"initial": initial, "final": final, "losses": trainer.losses}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_ddp_keeps_replicas_in_sync(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["initial"], r1["initial"])  # same seed → same init
    assert not torch.equal(r0["final"], r0["initial"])  # it trained
    assert torch.equal(r0["final"], r1["final"])  # gradients were all-reduced
    assert r0["losses"] == r1["losses"]  # the logged loss is the global mean
    assert (tmp_path / "checkpoint.pt").exists()  # rank 0 wrote it


# Run by torchrun in the tests below: tiny DDP training of `ldm.train.Trainer`; each rank writes the step it
# stopped at. With a "started" argument, rank 0 touches OUT/started after its first step.
TORCHRUN_WORKER = '''
import json, os, sys
import torch
from ldm.data import ImageDataset, load_dataset
from ldm.train import TrainConfig, Trainer
from ldm.unet import UNetConfig

out, minutes = sys.argv[1], float(sys.argv[2])
torch.set_num_threads(1)
data = load_dataset("mnist-bundled")
data = ImageDataset(data.images[:256].clone(), data.labels[:256].clone(), 10)
unet = UNetConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention=(False, False), mid_attention=False,
                  norm_groups=4)
config = TrainConfig(unet=unet, sample_n=0).with_(batch_size=16, max_minutes=minutes, warmup_steps=1, sample_every=0)
trainer = Trainer(config, out, dataset=data, progress=False)
step = trainer.train_step
def step_and_tell():
    loss = step()
    if trainer.step == 1 and trainer.rank == 0 and "started" in sys.argv:
        open(os.path.join(out, "started"), "w").close()
    return loss
trainer.train_step = step_and_tell
trainer.train()
with open(os.path.join(out, f"rank{trainer.rank}.json"), "w") as f:
    json.dump({"step": trainer.step}, f)
'''


def torchrun(tmp_path, minutes: float, *extra: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(script), str(out), str(minutes), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def stopped_steps(out) -> list[int]:
    return [json.loads((out / f"rank{r}.json").read_text())["step"] for r in (0, 1)]


def test_torchrun_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    process = torchrun(tmp_path, 0.05)  # 3 s: rank 0's clock decides, every rank follows
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    steps = stopped_steps(tmp_path / "run")
    assert steps[0] == steps[1] > 0
    assert safe_load(tmp_path / "run" / "checkpoint.pt")["step"] == steps[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json", "rank0.json",
                                                                     "rank1.json"]  # one checkpoint, no leftovers


def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint(tmp_path):
    process = torchrun(tmp_path, 10.0, "started")
    waited = time.monotonic()
    while not (tmp_path / "run" / "started").exists():
        assert process.poll() is None and time.monotonic() - waited < 240, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # as a cluster scheduler does; torchrun passes it to every worker
    log, _ = process.communicate(timeout=120)
    steps = stopped_steps(tmp_path / "run")
    assert steps[0] == steps[1] > 0, log
    assert safe_load(tmp_path / "run" / "checkpoint.pt")["step"] == steps[0]
    assert "stopped by SIGTERM" in log
