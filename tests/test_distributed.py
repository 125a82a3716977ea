"""Two CPU processes with torch.distributed (gloo), as `torchrun --nproc_per_node 2` would start them."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
