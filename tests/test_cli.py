import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.loading import load_pipeline
from ldm.unet import UNet

TINY = ["--unet.channels", "16", "--channel-mult", "1,2", "--attention", "false,true", "--num-res-blocks", "1",
        "--norm-groups", "8", "--head-dim", "16", "--batch-size", "16", "--sample-n", "4", "--sample-steps", "2",
        "--sample-every", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--preset", "mnist", "--out", str(out), "--steps", "3", "--class-conditional", *TINY])
    return out


def test_train_writes_run_and_resume_continues(run_dir, capsys):
    assert {"checkpoint.pt", "config.json", "samples.png"} <= {p.name for p in run_dir.iterdir()}
    main(["train", "--preset", "mnist", "--out", str(run_dir), "--steps", "5", "--class-conditional", "--resume", *TINY])
    assert "trained to step 5" in capsys.readouterr().out


def test_the_mnist_preset_is_class_conditional_and_false_turns_it_off(tmp_path, capsys):
    main(["train", "--preset", "mnist", "--out", str(tmp_path / "c"), "--steps", "1", *TINY])
    assert "class-conditional (10% label dropout)" in capsys.readouterr().out
    assert load_pipeline(tmp_path / "c").unet.config.num_classes == 10
    main(["train", "--preset", "mnist", "--out", str(tmp_path / "u"), "--steps", "1", "--class-conditional", "false", *TINY])
    assert "class-conditional" not in capsys.readouterr().out
    assert load_pipeline(tmp_path / "u").unet.config.num_classes is None
    with pytest.raises(SystemExit):
        main(["train", "--preset", "mnist", "--out", str(tmp_path / "x"), "--steps", "1", "--class-conditional", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_sample_is_reproducible_and_writes_npy(run_dir, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for npy in (a, b):
        main(["sample", str(run_dir), "--steps", "4", "--n", "6", "--seed", "3", "--out", str(tmp_path / "g.png"), "--npy", str(npy)])
    x = np.load(a)
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(x, np.load(b))
    main(["sample", str(run_dir), "--steps", "4", "--n", "6", "--seed", "4", "--out", str(tmp_path / "g.png"), "--npy", str(a)])
    assert not np.array_equal(np.load(a), x)


def test_sample_of_fewer_images_than_classes_has_no_empty_columns(run_dir, tmp_path):
    out = tmp_path / "g.png"
    main(["sample", str(run_dir), "--steps", "2", "--n", "4", "--out", str(out)])
    width, height = Image.open(out).size
    assert width * 32 == height * (4 * 30 + 2)  # one row of four 28-pixel digits with 2-pixel gaps, at any scale


def test_sample_compile_compiles_the_pipeline(run_dir, tmp_path, monkeypatch):
    """--compile reaches ``Pipeline.compile`` (whose samples test_sampling compares with eager ones)."""
    from ldm.sampling import Pipeline

    compiled = []
    monkeypatch.setattr(Pipeline, "compile", lambda pipe: compiled.append(pipe) or pipe)
    for extra in ([], ["--compile"]):
        main(["sample", str(run_dir), "--steps", "1", "--n", "1", "--out", str(tmp_path / "g.png"), *extra])
    assert len(compiled) == 1


def test_sample_trajectory_class_and_guidance(run_dir, tmp_path, monkeypatch):
    """--trajectory writes OUT_trajectory.png (x_t over x̂_0 of the first sample at ≤ 10 evenly spaced steps) and
    OUT_trajectory.gif (one frame per kept step); --class conditions every sample on that label; --guidance is
    classifier-free guidance at that scale. Each changes the samples; the same options and seed repeat them."""
    # The few-step fixture's UNet barely reads its label (zero-initialised output layers, EMA ≈ init: class 3 vs 5
    # differ by ~1e-6). A spy records the labels each UNet call gets and adds a label-dependent term, so that a
    # label or a guidance scale that goes astray shows in the images.
    labels_seen = []
    forward = UNet.forward

    def spy(self, x, t, cond=None, *args, **kwargs):
        labels_seen.append(cond.tolist())
        return forward(self, x, t, cond, *args, **kwargs) + 0.02 * cond.to(x.dtype)[:, None, None, None]

    monkeypatch.setattr(UNet, "forward", spy)

    def run(name, steps, label, guidance, *extra):
        labels_seen.clear()
        npy = tmp_path / f"{name}.npy"
        main(["sample", str(run_dir), "--steps", str(steps), "--n", "4", "--class", str(label), "--guidance",
              str(guidance), "--sampler", "ddpm", "--seed", "1", "--out", str(tmp_path / f"{name}.png"), "--npy", str(npy),
              *extra])
        return np.load(npy)

    x = run("t.v1", 11, 3, 3, "--trajectory")  # a dot in the stem: the trajectory files keep it
    # each step: one UNet call on 4 samples conditioned on class 3 and the same 4 with the null label 10
    assert [sorted(labels) for labels in labels_seen] == [[3] * 4 + [10] * 4] * 11
    # the same run through the pipeline: its final samples are the CLI's, its records what the trajectory shows
    pipe = load_pipeline(str(run_dir), device="cpu")
    with torch.inference_mode():
        records = list(pipe.loop(4, class_label=3, guidance_scale=3.0, sampler="ddpm", num_inference_steps=11, seed=1))
    assert np.array_equal((records[-1].x_prev.clamp(-1, 1).numpy() + 1) / 2, x)
    kept = [records[i] for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)]  # 10 of 11 steps, evenly spaced, first and last
    tile, pad, scale = 28, 2, 3  # digits are enlarged ×3 in trajectories; grids pad 2 pixels
    u8 = lambda v: ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].numpy()  # (1, H, W) in [−1, 1] → (H, W)

    def grid(rows, width):  # rows of (28, width) uint8 tiles on black, 2-pixel gaps, enlarged ×3 (nearest)
        out = np.zeros((pad + len(rows) * (tile + pad), pad + len(rows[0]) * (width + pad)), np.uint8)
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                y, x_ = pad + r * (tile + pad), pad + c * (width + pad)
                out[y:y + tile, x_:x_ + width] = image
        return out.repeat(scale, 0).repeat(scale, 1)

    # the strip: the first sample, x_t on top and x̂_0 below, one column per kept step (906 × 186)
    strip = np.asarray(Image.open(tmp_path / "t.v1_trajectory.png"))
    assert strip.shape == (scale * (pad + 2 * (tile + pad)), scale * (pad + 10 * (tile + pad)))
    assert np.array_equal(strip, grid([[u8(r.x_t[0]) for r in kept], [u8(r.x0_pred[0]) for r in kept]], tile))
    # the GIF: a frame per kept step, the 4 samples in a 2×2 grid, each x_t | x̂_0 side by side (354 × 186)
    gif = Image.open(tmp_path / "t.v1_trajectory.gif")
    assert gif.n_frames == 10 and gif.size == (scale * (pad + 2 * (2 * tile + pad)), scale * (pad + 2 * (tile + pad)))
    for k in (0, 4, 9):
        gif.seek(k)
        pairs = [np.hstack([u8(kept[k].x_t[i]), u8(kept[k].x0_pred[i])]) for i in range(4)]
        # within a grey level: PIL's GIF palette (256 colours) rounds a frame that uses nearly every grey
        frame = np.asarray(gif.convert("L")).astype(int)
        assert np.abs(frame - grid([pairs[:2], pairs[2:]], 2 * tile)).max() <= 1, k
    assert Image.open(tmp_path / "t.v1.png").size == (2 * (pad + 2 * (tile + pad)),) * 2  # 2×2 grid, --scale 2

    c3 = run("c3", 2, 3, 3)
    assert np.array_equal(run("c3_again", 2, 3, 3), c3)  # same class, guidance and seed: the same samples
    assert np.abs(run("c5", 2, 5, 3) - c3).max() > 0.05 and [sorted(c) for c in labels_seen] == [[5] * 4 + [10] * 4] * 2
    assert np.abs(run("g1", 2, 3, 1) - c3).max() > 0.05 and labels_seen == [[3] * 4] * 2  # scale 1: no guidance


def test_errors_are_clear(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--class", "12", "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert "class [12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--steps", "5000", "--out", str(tmp_path / "x.png")])
    assert "num_inference_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--prompt", "a 3", "--out", str(tmp_path / "x.png")])
    assert "is not a text-to-image model (it takes --class)" in capsys.readouterr().err
    bad = tmp_path / "broken.pt"
    bad.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main(["sample", str(bad), "--out", str(tmp_path / "x.png")])
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "r"), "--steps", "1", "--schedule.kind", "quadratic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "--schedule.kind" in err and "'quadratic'" in err and "linear, cosine" in err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "give a budget" in err and "--steps" in err and "--max-minutes" in err


@pytest.mark.parametrize("command", ["sample", "evaluate", "txt2img"])
@pytest.mark.parametrize("option", [["--n", "0"], ["--guidance", "-1"], ["--steps", "0"], ["--n", "two"]])
def test_nonsense_numbers_are_refused_by_name(command, option, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, str(run_dir), *(["--prompt", "a"] if command == "txt2img" else []), *option])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {option[0]}" in err
    assert ("expected a number" if option[1] == "two" else "must be ≥") in err


class Payload:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_malicious_checkpoint_is_refused_without_unsafe_advice(command, tmp_path, capsys):
    evil = tmp_path / "checkpoint.pt"
    torch.save({"config": {"unet": {}}, "payload": Payload()}, evil)
    with pytest.raises(SystemExit):
        main([command, str(evil), "--steps", "2"])
    out, err = capsys.readouterr()
    assert "this pickle ran code" not in out
    assert f"refusing to load {evil}: its pickle calls builtins.print" in err
    assert "will likely succeed" not in err and "trusted source" not in err  # torch's advice, not passed on


def test_the_summary_names_only_files_written(tmp_path, capsys):
    main(["train", "--out", str(tmp_path), "--steps", "1", *TINY, "--sample-n", "0"])
    out = capsys.readouterr().out
    assert f"trained to step 1; run directory {tmp_path} (checkpoint.pt, config.json)" in out
    assert not (tmp_path / "samples.png").exists()


def test_evaluate_scores_a_run_and_an_npy(run_dir, tmp_path, capsys):
    main(["evaluate", str(run_dir), "--n", "20", "--steps", "3"])
    out = capsys.readouterr().out
    assert "Fréchet distance" in out and "label accuracy" in out  # the run is class-conditional
    npy = tmp_path / "s.npy"
    np.save(npy, np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32))
    main(["evaluate", str(npy)])
    out = capsys.readouterr().out
    assert "confident" in out and "label accuracy" not in out


def test_latent_recipe_commands(tmp_path):
    vae_dir, run = tmp_path / "vae", tmp_path / "latent"
    main(["train-vae", "--preset", "mnist", "--out", str(vae_dir), "--steps", "2", "--vae.channels", "16",
          "--vae.norm-groups", "8", "--batch-size", "16", "--sample-every", "0"])
    assert {"checkpoint.pt", "config.json", "metrics.json", "samples.png"} <= {p.name for p in vae_dir.iterdir()}
    main(["train", "--preset", "mnist-latent", "--vae", str(vae_dir), "--out", str(run), "--steps", "2",
          "--unet.channels", "16", "--norm-groups", "8", "--context-dim", "16", "--batch-size", "16",
          "--sample-n", "4", "--sample-steps", "2", "--sample-every", "0"])
    out = tmp_path / "g.png"
    main(["sample", str(run), "--n", "4", "--steps", "3", "--class", "5", "--guidance", "2", "--trajectory", "--out", str(out)])
    assert Image.open(tmp_path / "g_trajectory.gif").n_frames == 3
    assert Image.open(out).size == (2 * (2 + 2 * 34), 2 * (2 + 2 * 34))  # 2×2 grid of 32×32 decoded digits, scale 2


REQUIRED = {"train": ["--out", "x"], "train-vae": ["--out", "x"], "sample": ["m"], "evaluate": ["m"],
            "txt2img": ["m", "--prompt", "a"], "img2img": ["m", "--prompt", "a", "--image", "i.png"],
            "inpaint": ["m", "--prompt", "a", "--image", "i.png", "--mask", "k.png"], "inspect": ["m"],
            "convert": ["m", "out"], "finetune": ["m", "--data", "d", "--out", "x"], "info": ["i.png"],
            "studio": ["m"]}


def test_every_command_refuses_an_unknown_option_by_name(capsys):
    from ldm.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == set(REQUIRED)  # a new command needs its line here
    for command, required in REQUIRED.items():
        with pytest.raises(SystemExit) as exit_:
            main([command, *required, "--stesp", "3"])
        assert exit_.value.code not in (0, None), command
        assert "--stesp" in capsys.readouterr().err, command


def test_the_model_is_given_once_either_way(run_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    main(["sample", "--checkpoint", str(run_dir), "--steps", "2", "--n", "2", "--out", str(out)])
    assert out.is_file()
    capsys.readouterr()
    for twice_or_never in (["sample", str(run_dir), "--checkpoint", str(run_dir)], ["sample"]):
        with pytest.raises(SystemExit):
            main([*twice_or_never, "--steps", "2", "--out", str(out)])
        assert "give the model once" in capsys.readouterr().err
