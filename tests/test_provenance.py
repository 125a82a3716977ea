"""Settings in every PNG: the UIs' ``parameters`` text written and read, ldm's own chunk, cached model hashes, and the
commands that write, show and reproduce images (``ldm info``, ``--from-png``, ``--no-metadata``)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm.cli import main
from ldm.provenance import (MAX_METADATA, MetadataError, file_sha256, infotext, model_sha256, parse_infotext,
                            read_settings, save_png)
from ldm.samplers import SAMPLERS
from ldm.sd_checkpoint import save_diffusers_folder

from test_cli import TINY

A1111 = """masterpiece, a lighthouse
at dawn, (oil painting:1.2)
Negative prompt: lowres, bad anatomy
blurry
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567, Size: 512x768, Model hash: \
6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1"""


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def png_with(tmp_path, **chunks) -> str:
    """A PNG (a new file each call) with these tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    path = tmp_path / f"given{len(list(tmp_path.glob('given*.png')))}.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


# --- the parameters text ----------------------------------------------------------------------------------------------
def test_a_ui_parameters_text_is_read():
    settings = parse_infotext(A1111)
    assert settings["prompt"] == "masterpiece, a lighthouse\nat dawn, (oil painting:1.2)"
    assert settings["negative_prompt"] == "lowres, bad anatomy\nblurry"
    assert (settings["sampler"], settings["sigmas"]) == ("dpm++2m", "karras")
    assert (settings["steps"], settings["guidance_scale"], settings["seed"]) == (20, 7.0, 1234567)
    assert (settings["width"], settings["height"], settings["clip_skip"]) == (512, 768, 2)
    assert (settings["model"], settings["model_hash"]) == ("v1-5-pruned-emaonly", "6ce0161689")
    # the older spelling, the schedule in the sampler's name, and a prompt with no parameter line at all
    assert parse_infotext("a cat\nSteps: 5, Sampler: Euler a, Seed: 3")["sampler"] == "euler_a"
    assert parse_infotext("x\nSteps: 5, Sampler: DPM++ SDE Karras")["sigmas"] == "karras"
    assert parse_infotext("just a prompt, nothing else") == {"prompt": "just a prompt, nothing else",
                                                             "negative_prompt": None}


def test_written_parameters_read_back_with_quoted_values():
    settings = dict(prompt="a cat, on a mat", negative_prompt="dogs", steps=25, sampler="lms", sigmas="karras",
                    guidance_scale=7.5, seed=42, width=640, height=512, model='odd, "name": v2',
                    model_sha256="ab" * 32, clip_skip=2)
    text = infotext(settings)
    assert text.split("\n")[-1].startswith("Steps: 25, Sampler: LMS Karras, CFG scale: 7.5, Seed: 42, Size: 640x512, "
                                           "Model hash: abababab")
    back = parse_infotext(text)
    assert back["model"] == settings["model"] and back["model_hash"] == "ab" * 5
    assert {k: back[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "sigmas", "guidance_scale", "seed",
                                 "width", "height", "clip_skip")} == {k: settings[k] for k in back if k in settings
                                                                      and k != "model"}


@pytest.mark.parametrize("line, message", [
    ("Steps: 20, Sampler: UniPC, Seed: 1", "sampler 'UniPC', which ldm does not have"),
    ("Steps: 20, Sampler: Euler, Seed: abc", "Seed: 'abc' is not a number"),
    ("Steps: 20, Sampler: Euler, Size: big", "Size: 'big' is not WIDTHxHEIGHT"),
    ("Steps: 20, Sampler: Euler, Schedule type: Polyexponential", "Schedule type 'Polyexponential'"),
])
def test_bad_parameters_are_named(line, message):
    with pytest.raises(MetadataError, match=message):
        parse_infotext(f"a cat\n{line}")


# --- PNG files ------------------------------------------------------------------------------------------------------
def test_save_png_writes_both_chunks_and_read_settings_prefers_ldms(tmp_path):
    settings = dict(command="txt2img", prompt="ünïcode, ok", sampler="euler", steps=3, seed=1, width=8, height=8)
    path = save_png(Image.new("RGB", (8, 8), (9, 8, 7)), tmp_path / "a.png", settings)
    chunks = Image.open(path).text
    assert json.loads(chunks["ldm"])["prompt"] == "ünïcode, ok" and chunks["parameters"].startswith("ünïcode, ok\n")
    assert read_settings(path) == {**settings, "ldm_version": json.loads(chunks["ldm"])["ldm_version"], "source": "ldm"}
    assert pixels(path).tolist() == np.full((8, 8, 3), (9, 8, 7)).tolist()
    assert not Image.open(save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", None)).text
    assert read_settings(png_with(tmp_path, parameters=A1111))["source"] == "parameters"


def test_bad_metadata_is_refused_with_one_clear_message(tmp_path):
    cases = [(png_with(tmp_path, Comment="hi"), "no generation settings"),
             (png_with(tmp_path, parameters="a" * (MAX_METADATA + 1)), "more than settings take"),
             (png_with(tmp_path, ldm="{not json"), "not valid JSON"),
             (png_with(tmp_path, ldm="[1, 2]"), "not a JSON object"),
             (png_with(tmp_path, parameters="a cat\nSteps: 2, Seed: 1e999x, Sampler: Euler"), "is not a number")]
    for path, message in cases:
        with pytest.raises(MetadataError, match=message):
            read_settings(path)
    whole = (tmp_path / "given0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MetadataError, match="not a readable image"):
        read_settings(tmp_path / "cut.png")
    bomb = PngImagePlugin.PngInfo()  # 20 kB on disk, 20 MB of text once inflated
    bomb.add_itxt("parameters", "a" * (20 << 20), zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "bomb.png", pnginfo=bomb)
    with pytest.raises(MetadataError, match="Decompressed data too large"):
        read_settings(tmp_path / "bomb.png")
    # latin-1 bytes in a tEXt chunk (not UTF-8) read as text, as PNG defines tEXt
    raw = png_with(tmp_path, parameters="caf\xe9 au lait\nSteps: 2, Sampler: Euler, Seed: 5")
    assert read_settings(raw)["prompt"] == "café au lait"


# --- model hashes -----------------------------------------------------------------------------------------------------
def test_hashes_are_the_files_sha256_and_cached_by_path_size_and_mtime(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(1 << 20))
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model) == model_sha256(model) == expected
    stat = model.stat()
    model.write_bytes(os.urandom(1 << 20))  # new bytes, same size and times: the cache answers without reading
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(model) == expected
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest() != expected
    (tmp_path / "cache" / "hashes.json").write_text("{damaged")  # a damaged cache is rebuilt, not an error
    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_folder_hash_covers_every_file(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "w.safetensors").write_bytes(b"1234")
    (tmp_path / "m" / "model_index.json").write_text("{}")
    before = model_sha256(tmp_path / "m")
    (tmp_path / "m" / "unet" / "w.safetensors").write_bytes(b"1235")
    assert model_sha256(tmp_path / "m") != before


# --- the commands -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--preset", "mnist", "--out", str(out), "--steps", "3", "--class-conditional", *TINY])
    return out


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "lcm"])  # LCM: for LCM-distilled SD models
def test_sample_from_png_reproduces_the_grid(sampler, run_dir, tmp_path, capsys):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    main(["sample", str(run_dir), "--sampler", sampler, "--steps", "3", "--n", "4", "--seed", "7", "--guidance", "2",
          "--out", str(first)])
    main(["sample", "--from-png", str(first), "--out", str(again)])
    assert np.array_equal(pixels(first), pixels(again))
    capsys.readouterr()
    main(["info", str(first)])
    shown = capsys.readouterr().out
    assert f"ldm sample --from-png {first}" in shown and '"seed": 7' in shown and "CFG scale: 2.0" in shown


def test_no_metadata_and_a_png_without_settings(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare.png"
    main(["sample", str(run_dir), "--steps", "2", "--n", "2", "--no-metadata", "--out", str(bare)])
    assert not Image.open(bare).text
    capsys.readouterr()
    for command in (["sample", "--from-png", str(bare)], ["info", str(bare)]):
        with pytest.raises(SystemExit):
            main(command)
        err = capsys.readouterr().err
        assert "no generation settings" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("field, value", [("seed", "abc"), ("steps", -3), ("sampler", "PLMS"), ("raw_weights", "yes"),
                                          ("seeds", "1,x"), ("guidance_scale", [1, 2]), ("nrow", 2.5)])
def test_hostile_ldm_settings_are_refused_by_name(field, value, run_dir, tmp_path, capsys):
    settings = {"command": "sample", "model_path": str(run_dir), field: value}
    png = png_with(tmp_path, ldm=json.dumps(settings))
    with pytest.raises(SystemExit):
        main(["sample", "--from-png", png, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert f"its {field} (" in err and "is not a value --" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A random-weight Stable Diffusion folder (every layer initialised) written by ldm: no reference library needed."""
    from test_sampling import stable_diffusion

    return save_diffusers_folder(stable_diffusion(), tmp_path_factory.mktemp("sd") / "model")


@pytest.mark.parametrize("sampler", [*SAMPLERS, "DPM++ 2M Karras"])
def test_txt2img_from_png_reproduces_each_image(sampler, sd_folder, tmp_path, capsys):
    out = tmp_path / "cat.png"
    main(["txt2img", str(sd_folder), "--prompt", "a red cat, sitting", "--negative-prompt", "dog", "--steps", "3",
          "--sampler", sampler, "--n", "2", "--seed", "5", "--guidance", "4", "--out", str(out)])
    second = tmp_path / "cat_1.png"
    parameters = Image.open(second).text["parameters"]
    assert parameters.startswith("a red cat, sitting\nNegative prompt: dog\nSteps: 3, ")
    assert "Seed: 6, Size: 32x32, Model hash: " in parameters and "CFG scale: 4.0" in parameters
    main(["txt2img", "--from-png", str(second), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(second))
    # the check can see a difference: the other seed's image is another image
    assert np.abs(pixels(tmp_path / "cat_0.png").astype(int) - pixels(second)).mean() > 5


def test_txt2img_reads_a_ui_png_and_warns_of_another_model(sd_folder, tmp_path, capsys):
    text = ("a red cat\nNegative prompt: dog\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 11, Size: 32x32, "
            "Model hash: 0123456789, Model: somebody-else")
    given = png_with(tmp_path, parameters=text)
    with pytest.raises(SystemExit):  # a UI's PNG does not say where its model is
        main(["txt2img", "--from-png", given, "--out", str(tmp_path / "x.png")])
    assert "names model 'somebody-else' (hash 0123456789) but not where it is" in capsys.readouterr().err
    main(["txt2img", str(sd_folder), "--from-png", given, "--out", str(tmp_path / "ui.png")])
    assert "was made with 0123456789…: the image will differ" in capsys.readouterr().err
    main(["txt2img", str(sd_folder), "--prompt", "a red cat", "--negative-prompt", "dog", "--steps", "2", "--sampler",
          "Euler a", "--guidance", "3", "--seed", "11", "--width", "32", "--height", "32", "--out",
          str(tmp_path / "direct.png")])
    assert np.array_equal(pixels(tmp_path / "ui.png"), pixels(tmp_path / "direct.png"))
    # the exact comparison sees the settings read (another negative prompt or CFG scale moves many pixels), and an
    # option on the command line wins over the image's
    for changed in (["--negative-prompt", "a blue sky"], ["--guidance", "5"]):
        main(["txt2img", str(sd_folder), "--from-png", given, *changed, "--out", str(tmp_path / "other.png")])
        assert np.abs(pixels(tmp_path / "other.png").astype(int) - pixels(tmp_path / "ui.png")).mean() > 0.3, changed
