import numpy as np
import pytest
from PIL import Image

from ldm.cli import main

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


def test_sample_is_reproducible_and_writes_npy(run_dir, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for npy in (a, b):
        main(["sample", str(run_dir), "--steps", "4", "--n", "6", "--seed", "3", "--out", str(tmp_path / "g.png"), "--npy", str(npy)])
    x = np.load(a)
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(x, np.load(b))
    main(["sample", str(run_dir), "--steps", "4", "--n", "6", "--seed", "4", "--out", str(tmp_path / "g.png"), "--npy", str(a)])
    assert not np.array_equal(np.load(a), x)


def test_sample_trajectory_class_and_guidance(run_dir, tmp_path):
    out = tmp_path / "t.v1.png"  # a dot in the stem: the trajectory files keep it
    main(["sample", str(run_dir), "--steps", "5", "--n", "4", "--class", "7", "--guidance", "3", "--trajectory",
          "--sampler", "ddpm", "--out", str(out)])
    assert Image.open(out).size[0] > 0
    assert Image.open(tmp_path / "t.v1_trajectory.gif").n_frames == 5
    assert Image.open(tmp_path / "t.v1_trajectory.png").size[1] > 2 * 28


def test_errors_are_clear(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--class", "12", "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert "class [12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(run_dir), "--steps", "5000", "--out", str(tmp_path / "x.png")])
    assert "num_inference_steps" in capsys.readouterr().err
    bad = tmp_path / "broken.pt"
    bad.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main(["sample", str(bad), "--out", str(tmp_path / "x.png")])
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), "--steps", "1", "--schedule.kind", "quadratic"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r")])


def test_evaluate_scores_a_run_and_an_npy(run_dir, tmp_path, monkeypatch, capsys):
    import ldm.metrics

    classifier, _ = ldm.metrics.train_classifier(steps=30, progress=False)
    monkeypatch.setattr(ldm.metrics, "load_classifier", lambda *a, **k: classifier)
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
            "convert": ["m", "out"]}


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
