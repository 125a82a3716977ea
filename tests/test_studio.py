"""The studio: its logic on a toy run and a Stable Diffusion folder, its server (queue, cancel, bad requests) through
Gradio's client, and the page itself in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.loading import load_pipeline
from ldm.provenance import read_settings
from ldm.studio import Request, Studio, check_port

from test_cli import TINY

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ARTIFACTS = Path(os.environ.get("LDM_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--preset", "mnist", "--out", str(out), "--steps", "3", "--class-conditional", *TINY])
    return out


@pytest.fixture(scope="module")
def studio(run_dir, tmp_path_factory):
    return Studio(load_pipeline(run_dir), run_dir, tmp_path_factory.mktemp("studio"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- the logic --------------------------------------------------------------------------------------------------------
def test_a_run_previews_every_step_and_its_png_is_made_again_by_the_cli(studio, tmp_path):
    frames = list(studio.run(Request(class_label=3, seed=5, sampler="DPM++ 2M Karras", steps=6, guidance=2.0)))
    assert [(f.step, f.total) for f in frames[:-1]] == [(k, 6) for k in range(1, 7)] and frames[-1].png is not None
    trajectory = frames[-1].trajectory  # x_t beside x̂₀ (this 3-step model's x̂₀ is clipped flat; x_t is not)
    assert len(trajectory) == 6 and trajectory[0].width > 2 * frames[0].preview.width
    assert np.abs(np.asarray(trajectory[0], float) - np.asarray(trajectory[-1], float)).mean() > 5
    settings = read_settings(frames[-1].png)
    assert (settings["command"], settings["class_label"], settings["seed"]) == ("sample", 3, 5)
    main(["sample", "--from-png", str(frames[-1].png), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(frames[-1].png))
    assert studio.from_png(frames[-1].png) == Request(class_label=3, seed=5, sampler="DPM++ 2M Karras", steps=6,
                                                      guidance=2.0)


def test_bad_requests_are_named(studio):
    for request, message in ((Request(steps=0), "steps must be 1 … 1000"), (Request(sampler="PLMS"), "PLMS"),
                             (Request(seed=2**64), "seed must be 0 … 2"),
                             (Request(guidance=-1), "guidance must be ≥ 0")):
        with pytest.raises(ValueError, match=message):
            list(studio.run(request))


def test_a_stable_diffusion_studio_writes_what_txt2img_makes_again(tmp_path):
    from test_sampling import stable_diffusion

    from ldm.sd_checkpoint import save_diffusers_folder

    folder = save_diffusers_folder(stable_diffusion(), tmp_path / "sd")
    sd = Studio(load_pipeline(folder), folder, tmp_path / "out")
    with pytest.raises(ValueError, match="write a prompt"):
        list(sd.run(Request()))
    with pytest.raises(ValueError, match="width 33 is not divisible by 2"):
        list(sd.run(Request(prompt="a cat", width=33)))
    request = Request(prompt="a red cat", negative_prompt="dog", seed=3, sampler="euler_a", steps=3, guidance=4.0,
                      width=32, height=32)
    last = list(sd.run(request))[-1]
    assert last.image.size == (32, 32) and read_settings(last.png)["prompt"] == "a red cat"
    main(["txt2img", "--from-png", str(last.png), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(last.png))
    assert sd.from_png(last.png) == request


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match=f"port {taken.getsockname()[1]} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", taken.getsockname()[1])


# --- the server -------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    pytest.importorskip("gradio")
    from ldm.studio import serve

    port = free_port()
    page = serve(run_dir, port=port, block=False, device="cpu")
    yield f"http://127.0.0.1:{port}/"
    page.close()


def form(steps: int, seed: int = 0, label: int = 1):
    """The generate endpoint's inputs: prompt, negative prompt, class, seed, random seed, sampler, steps,
    guidance, width, height."""
    return ("", "", label, seed, False, "ddim", steps, 2.0, 512, 512)


def test_requests_queue_one_at_a_time_and_a_cancelled_one_frees_the_model(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(server, verbose=False)
    long = client.submit(*form(steps=1000), api_name="/generate")
    deadline = time.monotonic() + 60
    while long.status().code not in (Status.ITERATING, Status.PROCESSING) and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = client.submit(*form(steps=3, seed=9), api_name="/generate")
    ranks = []
    while time.monotonic() < deadline and len(ranks) < 3:
        status = waiting.status()
        if status.code == Status.IN_QUEUE and status.rank is not None:
            ranks.append(status.rank)
        time.sleep(0.05)
    assert ranks and ranks[-1] == 0, ranks  # next in line behind the long request
    assert not waiting.done()
    long.cancel()
    outputs = waiting.result(timeout=60)
    assert "done: 3 steps, seed 9" in outputs[1]
    assert "done" in client.predict(*form(steps=2), api_name="/generate")[1]  # and the server goes on


def test_a_bad_request_is_an_error_on_the_page_not_the_end_of_the_server(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="seed must be 0 … 2"):
        client.predict(*form(steps=2, seed=-5), api_name="/generate")
    assert "done" in client.predict(*form(steps=2), api_name="/generate")[1]


def test_the_cli_warns_of_an_open_host_and_names_a_taken_port(run_dir, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["studio", str(run_dir), "--host", "0.0.0.0", "--port", str(port)])
    err = capsys.readouterr().err
    assert "has no authentication" in err and f"port {port} on 0.0.0.0 is in use" in err
    with pytest.raises(SystemExit):
        main(["studio", str(run_dir / "missing"), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert "missing" in err and err.count("\n") == 1, err


# --- the page, in a browser -------------------------------------------------------------------------------------------
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    return path


def test_the_page_in_a_browser(server, tmp_path):
    """Generate, watch the preview change while sampling, scrub the trajectory, download the PNG and read its
    settings, then drop it on the form to read them back; screenshots in test-artifacts/."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=args)
        page = browser.new_page(accept_downloads=True)
        page.goto(server, timeout=60_000)
        page.locator("#steps input[type=number]").fill("400")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#seed input").fill("21")
        page.locator("#generate").click()
        sources, deadline = set(), time.monotonic() + 120
        while time.monotonic() < deadline and "done" not in page.locator("#status").inner_text():
            image = page.locator("#preview img")
            if image.count():
                sources.add(image.first.get_attribute("src"))
            if len(sources) == 3:
                page.screenshot(path=str(ARTIFACTS / "studio-sampling.png"))
            time.sleep(0.02)
        assert "done: 400 steps, seed 21" in page.locator("#status").inner_text()
        assert len(sources) >= 3, "the preview did not change while sampling"
        page.screenshot(path=str(ARTIFACTS / "studio-done.png"), full_page=True)

        strip = page.locator("#strip img").first
        before = strip.get_attribute("src")
        page.locator("#scrub input[type=number]").fill("1")
        page.locator("#scrub input[type=number]").press("Enter")
        page.wait_for_function("src => document.querySelector('#strip img').src !== src", arg=before, timeout=30_000)

        with page.expect_download() as download:
            page.locator("#download").click()
        png = tmp_path / "download.png"
        download.value.save_as(png)
        settings = read_settings(png)
        assert (settings["command"], settings["seed"], settings["steps"], settings["class_label"]) == \
            ("sample", 21, 400, 0)

        page.locator("#seed input").fill("1")
        page.locator("#reproduce input[type=file]").set_input_files(str(png))
        page.wait_for_function("() => document.querySelector('#seed input').value === '21'", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "studio-reproduce.png"), full_page=True)
        browser.close()
