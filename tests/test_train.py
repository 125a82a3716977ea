import json
import os
import signal

import pytest
import torch

from ldm.checkpoint import CheckpointError, safe_load
from ldm.cli import override_config
from ldm.data import ImageDataset
from ldm.losses import diffusion_loss
from ldm.loop import TrainingDiverged, epoch_indices
from ldm.train import Trainer


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overfits_one_batch(tiny_config, mnist_small, tmp_path):
    """A model that cannot drive the loss down on 8 fixed images has a broken gradient path."""
    trainer = Trainer(tiny_config.with_(batch_size=8), tmp_path, dataset=mnist_small, progress=False)
    x0, _ = mnist_small.batch(torch.arange(8))
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
    model = trainer.model
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = lambda: diffusion_loss(model, trainer.schedule, x0, t=t, noise=noise).mean()
    with torch.no_grad():
        model.eval()
        before = loss_fn().item()
    model.train()
    for _ in range(120):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < 0.25 * before, (before, after)


def test_loss_goes_down_on_real_digits(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=60, lr=3e-3), tmp_path, dataset=mnist_small, progress=False)
    trainer.train()
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["unet"]["channels"] == 16
    assert (tmp_path / "samples.png").exists()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_resume_equals_uninterrupted(tiny_config, mnist_small, tmp_path, compile):
    # exercises dropout + label-dropout RNG; compiled, inductor's own dropout kernels draw from the saved global RNG
    config = tiny_config.with_(class_conditional=True, class_dropout=0.3, compile=compile)
    straight = Trainer(config.with_(steps=6), tmp_path / "a", dataset=mnist_small, progress=False)
    straight.train()

    first = Trainer(config.with_(steps=3), tmp_path / "b", dataset=mnist_small, progress=False)
    first.train()
    torch.manual_seed(1234)  # the resumed process starts from a different global RNG state
    second = Trainer(config.with_(steps=6), tmp_path / "b", dataset=mnist_small, progress=False)
    second.resume()
    assert second.step == 3
    second.train()

    assert second.losses == straight.losses
    assert states_equal(second.model.state_dict(), straight.model.state_dict())
    assert states_equal(second.ema.model.state_dict(), straight.ema.model.state_dict())
    assert isinstance(second.ddp_model, torch._dynamo.eval_frame.OptimizedModule) == compile


def test_resume_refuses_another_config(tiny_config, mnist_small, tmp_path):
    Trainer(tiny_config.with_(steps=1), tmp_path, dataset=mnist_small, progress=False).train()
    other = Trainer(tiny_config.with_(unet=tiny_config.unet.with_(channels=32)), tmp_path, dataset=mnist_small, progress=False)
    with pytest.raises(CheckpointError, match="another model config"):
        other.resume()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=4, checkpoint_every=2), tmp_path, dataset=mnist_small, progress=False)
    trainer.train()
    good = safe_load(tmp_path / "checkpoint.pt")
    with torch.no_grad():
        trainer.model.conv_in.weight.fill_(float("nan"))
    trainer.config = trainer.config.with_(steps=8)
    with pytest.raises(TrainingDiverged, match="step 4"):
        trainer.train()
    kept = safe_load(tmp_path / "checkpoint.pt")
    assert kept["step"] == 4 and states_equal(kept["model"], good["model"])


def test_sigterm_stops_with_a_checkpoint(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=100), tmp_path, dataset=mnist_small, progress=False)
    step = trainer.train_step

    def step_then_kill():
        loss = step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    trainer.train_step = step_then_kill
    trainer.train()
    assert safe_load(tmp_path / "checkpoint.pt")["step"] == 3


def test_class_conditional_without_labels_says_how_to_turn_it_off(tiny_config, mnist_small, tmp_path):
    unlabelled = ImageDataset(mnist_small.images, None, None, name="a folder")
    with pytest.raises(ValueError, match="needs a labelled dataset.*--class-conditional false"):
        Trainer(tiny_config.with_(class_conditional=True), tmp_path / "run", dataset=unlabelled, progress=False)


def test_epoch_indices_are_a_permutation_per_epoch():
    seen = torch.cat([epoch_indices(100, 10, s, seed=0) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    assert torch.equal(epoch_indices(100, 10, 3, 0), epoch_indices(100, 10, 3, 0))
    assert not torch.equal(epoch_indices(100, 10, 0, 0), epoch_indices(100, 10, 10, 0))  # next epoch reshuffles
    with pytest.raises(ValueError, match="larger than the dataset"):
        epoch_indices(5, 10, 0, 0)


def test_budget_required(tiny_config, mnist_small, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        Trainer(tiny_config.with_(steps=None), tmp_path, dataset=mnist_small, progress=False).train()


def test_gradient_checkpointing_is_a_loop_switch_that_trains_the_same(tiny_config, mnist_small, tmp_path):
    # a loop switch (`ldm train … --gradient-checkpointing true`): less memory, the same steps (dropout included)
    on = override_config(tiny_config.with_(steps=2), ["--gradient-checkpointing", "true"])
    runs = [Trainer(config, tmp_path / str(i), dataset=mnist_small, progress=False)
            for i, config in enumerate([tiny_config.with_(steps=2), on])]
    for run in runs:
        run.train()
    assert [run.model.gradient_checkpointing for run in runs] == [False, True]
    # the losses, not the weights: Adam divides by √v, so a gradient that is ~0 (a zero-initialised conv's
    # first steps) turns rounding noise into a full-size step; the gradients themselves agree to 1e-6
    # (tests/test_gradient_checkpointing.py)
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-6)


def test_bf16_autocast_trains_on_cpu(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=3, mixed_precision="bf16", channels_last=True), tmp_path,
                      dataset=mnist_small, progress=False)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert trainer.model.conv_in.weight.dtype == torch.float32  # autocast keeps master weights in fp32


def test_adamw_is_fused_where_torch_can_and_a_checkpoint_does_not_change_that(tiny_config, mnist_small, tmp_path):
    trainer = Trainer(tiny_config.with_(steps=2), tmp_path / "a", dataset=mnist_small, progress=False)
    fused = trainer.optimizer.param_groups[0]["fused"]
    assert fused == (torch.__version__ >= "2.4")  # CPU kernels from torch 2.4 (TorchVersion compares as versions)
    trainer.train()
    state = trainer.state_dict()
    for group in state["optimizer"]["param_groups"]:  # as a checkpoint from an older torch, or a GPU without it
        group["fused"] = not fused
    again = Trainer(tiny_config.with_(steps=4), tmp_path / "b", dataset=mnist_small, progress=False)
    again.load_state_dict(state)
    assert again.optimizer.param_groups[0]["fused"] == fused
    again.train()
    assert again.step == 4
