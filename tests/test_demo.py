"""``harmon demo`` in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

The app is started on a free loopback port with a tiny random pipeline loaded from a folder; the browser fills the
Generate and Describe tabs and the test compares what the page shows with what the pipeline itself returns for the
same arguments. Screenshots are written to ``results/screenshots/`` (git-ignored). The browser tests skip only
when chromium or chromedriver is not installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from harmon import cli
from harmon.demo import PIPELINE_CONCURRENCY_ID, build_demo, launch
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer
from harmon.validation import MAX_IMAGES_PER_CALL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "results" / "screenshots"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
)
STEPS = 4
TIMEOUT_S = 60

needs_browser = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER} not found; "
           "apt-get install -y chromium chromium-driver, as .ci/run does)",
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def app(pipe_folder):
    """The demo served from a pipeline folder, as ``harmon demo FOLDER`` does (loaded once)."""
    port = free_port()
    demo = launch(pipe_folder, host="127.0.0.1", port=port, device="cpu", block=False, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def reference(pipe_folder) -> HarmonPipeline:
    """The same pipeline, loaded separately: what the page shows must be what this one returns."""
    pipe = HarmonPipeline.from_pretrained(pipe_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Browser:
    def __init__(self, driver: webdriver.Chrome, url: str, downloads: Path):
        self.driver, self.url, self.downloads, self.requests = driver, url, downloads, []

    def open(self) -> None:
        self.driver.get(self.url)
        self.wait(lambda: self.find_all("#prompt textarea"), "the page to render")

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, what: str):
        try:
            return WebDriverWait(self.driver, TIMEOUT_S, poll_frequency=0.1).until(lambda _: condition())
        except Exception:
            self.screenshot("timeout")
            raise AssertionError(f"timed out waiting for {what}; page text:\n{self.find('body').text[-2000:]}")

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def click_label(self, css: str, text: str) -> None:
        [label] = [el for el in self.find_all(f"{css} label") if el.text.strip() == text]
        label.click()

    def value(self, css: str) -> str:
        return self.find(css).get_attribute("value")

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"demo_{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def collect_requests(self) -> list[str]:
        """URLs the page has requested so far (from chromium's network log)."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
        return self.requests


@pytest.fixture(scope="module")
def browser(app, tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield Browser(driver, app[1], downloads)
    finally:
        driver.quit()


def gallery_images(browser: Browser) -> list[tuple[str, tuple[int, int]]]:
    """(src, natural size) of every loaded image in the gallery."""
    found = []
    for img in browser.find_all("#gallery img"):
        size = browser.driver.execute_script(
            "return arguments[0].complete ? [arguments[0].naturalWidth, arguments[0].naturalHeight] : null", img)
        if size and size[0]:
            found.append((img.get_attribute("src"), tuple(size)))
    return found


def fetch_image(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        image = PIL.Image.open(io.BytesIO(response.read()))
    assert image.format == "PNG", f"{url}: the gallery should serve lossless PNGs, got {image.format}"
    return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------------- browser
@needs_browser
def test_generate_shows_the_pipelines_images_at_the_requested_size(browser, reference, monkeypatch):
    progress_calls = []
    report = gr.Progress.__call__

    def recording_progress(self, progress, *args, **kwargs):
        progress_calls.append(progress)
        return report(self, progress, *args, **kwargs)

    monkeypatch.setattr(gr.Progress, "__call__", recording_progress)
    browser.open()
    browser.type("#prompt textarea", "a red circle on the left")
    browser.type("#width input", "96")
    browser.type("#height input", "64")
    browser.type("#steps input", str(STEPS))
    browser.type("#seed input", "5")
    browser.type("#num-images input[type=number]", "2")
    browser.find("#generate").click()
    images = browser.wait(lambda: len(gallery_images(browser)) == 2 and gallery_images(browser), "two images")
    browser.screenshot("generate")

    assert [size for _, size in images] == [(96, 64), (96, 64)]
    assert browser.value("#used-seed input") == "5"
    expected = reference("a red circle on the left", width=96, height=64, num_inference_steps=STEPS,
                         num_images_per_prompt=2, generator=[seeded(5), seeded(6)], output_type="np").images
    shown = np.stack([fetch_image(src) for src, _ in images])
    assert np.array_equal(shown, (expected * 255).round().astype(np.uint8))  # PNG: lossless
    # the progress bar is fed by the pipeline's callback_on_step_end, once per MAR step
    assert [p for p in progress_calls if isinstance(p, tuple)] == [(k, STEPS) for k in range(1, STEPS + 1)]

    # download: open the first image and press the gallery's Download button
    browser.find("#gallery button.thumbnail-item").click()
    [download] = browser.wait(lambda: browser.find_all("#gallery button[aria-label=Download]"), "a download button")
    download.click()
    [saved] = browser.wait(lambda: list(browser.downloads.glob("*.png")), "the downloaded file")
    assert np.array_equal(np.asarray(PIL.Image.open(saved).convert("RGB")), shown[0])
    browser.find("#gallery button[aria-label=Close]").click()

    # "random seed": the page says which seed it drew, and that seed reproduces the image
    browser.find("#random-seed input").click()
    browser.type("#num-images input[type=number]", "1")
    browser.find("#generate").click()
    browser.wait(lambda: browser.value("#used-seed input") != "5" and len(gallery_images(browser)) == 1,
                 "a random-seed image")
    drawn = int(browser.value("#used-seed input"))
    [(src, size)] = gallery_images(browser)
    expected = reference("a red circle on the left", width=96, height=64, num_inference_steps=STEPS,
                         generator=seeded(drawn), output_type="np").images
    assert size == (96, 64)
    assert np.array_equal(fetch_image(src)[None], (expected * 255).round().astype(np.uint8))


@needs_browser
def test_describe_answers_about_the_uploaded_image(browser, reference, tmp_path):
    picture = PIL.Image.fromarray((np.arange(80 * 48 * 3).reshape(48, 80, 3) % 251).astype(np.uint8))
    path = tmp_path / "picture.png"
    picture.save(path)
    question = "What is in this image?"
    browser.open()
    [tab] = [b for b in browser.find_all("button[role=tab]") if b.text.strip() == "Describe"]
    tab.click()
    browser.wait(lambda: browser.find_all("#image input[type=file]"), "the Describe tab")
    browser.find("#image input[type=file]").send_keys(str(path))
    browser.wait(lambda: browser.find_all("#image img"), "the uploaded image's preview")
    browser.type("#question textarea", question)
    browser.type("#max-new-tokens input[type=number]", "12")
    browser.click_label("#decoding", "sampled")
    browser.type("#answer-seed input", "3")
    browser.find("#describe").click()
    answer = browser.wait(lambda: browser.value("#answer textarea"), "the answer")
    browser.screenshot("describe")

    expected = reference.understand(PIL.Image.open(path).convert("RGB"), question, max_new_tokens=12,
                                    do_sample=True, seed=3)
    assert expected.strip(), "the tiny model's sampled answer should be visible text"
    assert answer == expected


@needs_browser
def test_bad_inputs_show_the_pipelines_message_not_a_traceback(browser, reference):
    with pytest.raises(ValueError) as raised:
        reference("a cat", width=100, num_inference_steps=STEPS)
    message = str(raised.value)
    assert "width" in message
    browser.open()
    browser.type("#prompt textarea", "a cat")
    browser.type("#width input", "100")
    browser.type("#steps input", str(STEPS))
    browser.find("#generate").click()
    toast = browser.wait(lambda: [t.text for t in browser.find_all(".toast-body") if message in t.text],
                         "the error message")
    browser.screenshot("bad_size")
    assert toast
    page = browser.find("body").text
    assert "Traceback" not in page and "ValueError" not in page
    assert not gallery_images(browser)

    # Describe without an image: the pipeline's TypeError, in the page
    with pytest.raises(TypeError) as raised:
        reference.understand(None, "What is this?")
    [tab] = [b for b in browser.find_all("button[role=tab]") if b.text.strip() == "Describe"]
    tab.click()
    browser.wait(lambda: browser.find_all("#describe"), "the Describe tab")
    browser.find("#describe").click()
    browser.wait(lambda: [t for t in browser.find_all(".toast-body") if str(raised.value) in t.text],
                 "the missing-image message")
    browser.screenshot("no_image")
    assert "Traceback" not in browser.find("body").text


@needs_browser
def test_the_page_requests_nothing_beyond_the_app(browser):
    browser.open()
    browser.wait(lambda: browser.find_all("#generate"), "the page")
    web = [url for url in browser.collect_requests() if url.startswith(("http:", "https:", "ws:", "wss:"))]
    assert web, "no request recorded at all: the network log is not working"
    outside = [url for url in web if not url.split("//", 1)[1].startswith(browser.url.split("//", 1)[1])]
    assert outside == []


# ------------------------------------------------------------------------------------------ no browser needed
def test_concurrent_requests_queue_and_run_one_at_a_time(app, monkeypatch):
    """Three requests sent at once all complete, one after the other on the one pipeline (each request's MAR steps
    are reported together, never interleaved with another's)."""
    import threading
    import time

    from gradio_client import Client

    reports = []
    report = gr.Progress.__call__

    def slow_progress(self, progress, *args, **kwargs):
        if isinstance(progress, tuple):
            reports.append((threading.get_ident(), progress))
            time.sleep(0.05)  # long enough that overlapping requests would interleave their steps
        return report(self, progress, *args, **kwargs)

    monkeypatch.setattr(gr.Progress, "__call__", slow_progress)
    client = Client(app[1], verbose=False)
    arguments = dict(negative_prompt="", width=64, height=64, steps=STEPS, guidance_scale=3.0,
                     guidance_schedule="constant", temperature=1.0, sampler="exact", head_steps=0, random_seed=False,
                     num_images=1)
    jobs = [client.submit(prompt=f"prompt {k}", seed=k, api_name="/generate", **arguments) for k in range(3)]
    results = [job.result(timeout=TIMEOUT_S) for job in jobs]
    assert [seed for _, seed in results] == [0, 1, 2]
    steps = [step for _, (step, _) in reports]
    assert steps == list(range(1, STEPS + 1)) * 3, f"requests overlapped: {steps}"


def test_generate_from_an_image_through_the_api(app, reference, tmp_path):
    """The Generate tab's optional image: the gallery holds what ``pipe(image=..., prompt=instruction)`` returns."""
    from gradio_client import Client, handle_file

    path = tmp_path / "condition.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    client = Client(app[1], verbose=False)
    gallery, seed = client.predict(
        prompt="Keep it.", negative_prompt="", width=64, height=64, steps=STEPS, guidance_scale=3.0,
        guidance_schedule="constant", temperature=1.0, sampler="exact", head_steps=0, seed=7, random_seed=False,
        num_images=1, condition_image=handle_file(str(path)), api_name="/generate",
    )
    expected = reference(image=PIL.Image.open(path).convert("RGB"), prompt="Keep it.", width=64, height=64,
                         num_inference_steps=STEPS, generator=seeded(7)).images[0]
    shown = PIL.Image.open(gallery[0]["image"]).convert("RGB")
    assert seed == 7 and np.array_equal(np.asarray(shown), np.asarray(expected))


def test_both_tabs_share_one_queue_slot_and_the_queue_is_bounded():
    demo = build_demo(HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()), max_queue=3)
    functions = {fn.name: fn for fn in demo.fns.values()}
    assert set(functions) == {"generate", "describe"}
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in functions.values()} == {(PIPELINE_CONCURRENCY_ID, 1)}
    assert demo._queue.max_size == 3


@pytest.mark.parametrize(("name", "value"), [("max_images", 0), ("max_images", MAX_IMAGES_PER_CALL + 1),
                                             ("max_queue", 0)])
def test_build_demo_rejects_a_bad_bound_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        build_demo(HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()), **{name: value})


def test_cli_demo_verb_passes_its_options_to_launch(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("harmon.demo.launch", lambda pipeline, **options: calls.append((pipeline, options)))
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "my-folder", "--host", "0.0.0.0", "--port", "8000", "--share", "--device", "cuda",
                     "--dtype", "bf16", "--cpu-offload", "--max-images", "2", "--max-queue", "5"]) == 0
    (default, defaults), (folder, options) = calls
    assert default == "harmon-toy"
    assert defaults["share"] is False and defaults["host"] == "127.0.0.1" and defaults["cpu_offload"] is False
    assert folder == "my-folder"
    assert options == {"host": "0.0.0.0", "port": 8000, "share": True, "device": "cuda", "dtype": torch.bfloat16,
                       "cpu_offload": True, "max_images": 2, "max_queue": 5}
    with pytest.raises(SystemExit):
        cli.main(["demo", "--max-images", "0"])
    assert "--max-images: must be at least 1" in capsys.readouterr().err


def test_without_gradio_the_cli_says_which_extra_to_install(monkeypatch, pipe_folder):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    with pytest.raises(SystemExit, match=r'harmon demo: error: .*pip install "harmon\[demo\]"'):
        cli.main(["demo", str(pipe_folder)])
