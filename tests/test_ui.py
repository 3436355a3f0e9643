"""The page (`make ui`) driven by a real headless Chromium against the real tritonserver of the session.

What the page shows is checked against what the client library gets from the same server: the
overlay's pixels against the masks fetched independently, the scores, the cache state, the served
model's identity, and the server's own messages for what it refuses.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from clients.client import SegmentationClient
from clients.errors import ClientError
from clients.masks import overlay as upstream_overlay
from evfsam.processing import decode_image

pytestmark = pytest.mark.triton

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROMPTS = ["zebra top left", "the sky"]
ANSWER_TIMEOUT_S = 60.0  # the tiny model answers in well under a second


@pytest.fixture(scope="module")
def browser():
    from ui.browser import HeadlessChromium, missing_browser

    reason = missing_browser()
    if reason is not None:
        pytest.fail(reason)
    with HeadlessChromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def page(triton_server, tmp_path_factory):
    from ui.launch import PageProcess

    with PageProcess(triton_server.grpc_url, triton_server.http_url,
                     tmp_path_factory.mktemp("ui") / "page.log") as running:
        yield running


@pytest.fixture()
def fresh_page(browser, page):
    from ui.browser import open_page

    open_page(browser, page.url)
    return browser


def submit(browser, prompts: List[str], **fields) -> None:
    from ui.browser import submit as fill_and_submit

    fill_and_submit(browser, prompts, timeout=ANSWER_TIMEOUT_S, **fields)


def unique_image(tmp_path: Path, name: str, seed: int) -> Path:
    """The sample picture with a few pixels changed: bytes the server's cache has never seen."""
    rgb = decode_image((ASSETS / "sample.jpg").read_bytes()).copy()
    rgb[:2, :8] = np.random.default_rng(seed).integers(0, 256, size=(2, 8, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def client_error(url: str, protocol: str, image: bytes, prompts: List[str], **options) -> str:
    with SegmentationClient(url, protocol) as client, pytest.raises(ClientError) as failure:
        client.segment_prompts(image, prompts, **options)
    return str(failure.value)


def text_of(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.driver.find_element(By.ID, element_id).text


def shown_error(browser) -> str:
    from selenium.webdriver.common.by import By

    box = browser.driver.find_element(By.ID, "error")
    assert box.is_displayed(), "the page shows no error"
    assert not browser.driver.find_element(By.ID, "result").is_displayed()
    return text_of(browser, "error-message")


def shown_masks(browser) -> List[Dict[str, str]]:
    from selenium.webdriver.common.by import By

    assert not browser.driver.find_element(By.ID, "error").is_displayed(), text_of(browser, "error-message")
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    return [{"prompt": row.find_element(By.CLASS_NAME, "prompt").text,
             "score": row.find_element(By.CLASS_NAME, "score").text,
             "colour": row.find_element(By.CLASS_NAME, "swatch").get_attribute("data-colour"),
             "markup": row.find_element(By.CLASS_NAME, "prompt").get_attribute("innerHTML")} for row in rows]


def overlay_pixels(browser) -> np.ndarray:
    from selenium.webdriver.common.by import By

    return browser.image_pixels(browser.driver.find_element(By.ID, "overlay"))


def blended(rgb: np.ndarray, masks: List[np.ndarray], colours: List[str]) -> np.ndarray:
    """The documented drawing: inside mask i, pixel p -> trunc(p * 0.5 + colour_i * 0.5), in prompt order."""
    out = rgb.astype(np.float64)
    for mask, colour in zip(masks, colours):
        value = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)
        selected = mask.astype(bool)
        out[selected] = np.floor(out[selected] * 0.5 + value * 0.5)
    return out.astype(np.uint8)


def test_uploaded_image_masks_scores_and_cache_hit(fresh_page, triton_server, tmp_path):
    path = unique_image(tmp_path, "upload.png", seed=1)
    submit(fresh_page, PROMPTS, upload=path, protocol="grpc")
    shown = shown_masks(fresh_page)
    assert text_of(fresh_page, "cache-state") == "cache miss (encoded now)"
    assert text_of(fresh_page, "result-protocol") == "gRPC"

    image = path.read_bytes()
    with SegmentationClient(triton_server.grpc_url, "grpc") as client:
        served = client.segment_prompts(image, PROMPTS)
    assert [row["prompt"] for row in shown] == PROMPTS
    assert [row["score"] for row in shown] == [f"{s.score:.3f}" for s in served]
    assert text_of(fresh_page, "image-key") == served[0].image_key
    colours = [row["colour"] for row in shown]
    assert len(set(colours)) == len(PROMPTS)

    rgb = decode_image(image)
    pixels = overlay_pixels(fresh_page)
    masks = [s.mask for s in served]
    union = np.logical_or.reduce([m.astype(bool) for m in masks])
    assert 0 < union.sum() < union.size
    assert np.array_equal(pixels[~union], rgb[~union])  # unchanged outside every mask
    assert (pixels != rgb).any(axis=-1)[union].mean() > 0.99  # tinted inside
    assert np.array_equal(pixels, blended(rgb, masks, colours))

    submit(fresh_page, PROMPTS, protocol="grpc")  # the same image again
    assert text_of(fresh_page, "cache-state") == "cache hit"
    assert np.array_equal(overlay_pixels(fresh_page), pixels)


def test_switching_protocol_shows_the_same_masks_and_the_served_identity(fresh_page, triton_server, tmp_path):
    import tritonclient.http as httpclient

    path = unique_image(tmp_path, "switch.png", seed=2)
    submit(fresh_page, PROMPTS, upload=path, protocol="grpc")
    over_grpc = overlay_pixels(fresh_page)
    submit(fresh_page, PROMPTS, protocol="http")
    assert text_of(fresh_page, "result-protocol") == "HTTP"
    assert text_of(fresh_page, "cache-state") == "cache hit"
    assert np.array_equal(overlay_pixels(fresh_page), over_grpc)

    config = httpclient.InferenceServerClient(triton_server.http_url).get_model_config("evf_sam_prompts")
    served = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert text_of(fresh_page, "model-name") == "evf_sam_prompts"
    for field in ("checkpoint", "family", "recipe"):
        assert text_of(fresh_page, f"model-{field}") == served[field]
    assert text_of(fresh_page, "model-sha256") == served["checkpoint_sha256"]
    assert Path(served["checkpoint"]).resolve() == triton_server.checkpoint_dir.resolve()


def test_shipped_sample_and_prompts_shown_as_text(fresh_page, page):
    assert page.info()["samples"] == sorted(p.name for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
    prompts = ["<b>bold</b> & <img src=x>", "zebra"]
    submit(fresh_page, prompts, sample="sample.jpg", protocol="grpc")
    shown = shown_masks(fresh_page)
    assert [row["prompt"] for row in shown] == prompts
    assert shown[0]["markup"] == "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;img src=x&gt;"  # text, never markup
    assert overlay_pixels(fresh_page).shape == decode_image((ASSETS / "sample.jpg").read_bytes()).shape


def test_bad_upload_shows_the_servers_message(fresh_page, triton_server, tmp_path):
    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"this is a text file, not an image\n")
    submit(fresh_page, PROMPTS, upload=fake)
    expected = client_error(triton_server.grpc_url, "grpc", fake.read_bytes(), PROMPTS)
    assert "not a recognised image format" in expected
    assert shown_error(fresh_page) == expected


def test_empty_prompt_shows_the_servers_message(fresh_page, triton_server):
    submit(fresh_page, [], sample="sample.jpg", protocol="http")
    expected = client_error(triton_server.http_url, "http", (ASSETS / "sample.jpg").read_bytes(), [""])
    assert "empty" in expected
    assert shown_error(fresh_page) == expected


def test_image_key_reuse_and_an_evicted_key(fresh_page, triton_server, tmp_path):
    path = unique_image(tmp_path, "keyed.png", seed=3)
    submit(fresh_page, ["zebra"], upload=path, protocol="grpc")
    key = text_of(fresh_page, "image-key")
    submit(fresh_page, ["the sky"], reuse_key=True)
    assert text_of(fresh_page, "cache-state") == "cache hit (sent its key only)"
    with SegmentationClient(triton_server.grpc_url, "grpc") as client:
        for seed in (4, 5):  # the test cache holds two images: these two evict the first
            client.segment_prompts(unique_image(tmp_path, f"evict{seed}.png", seed).read_bytes(), ["x"])
    submit(fresh_page, ["the sky"], reuse_key=True)
    expected = client_error(triton_server.grpc_url, "grpc", None, ["the sky"], image_key=key)
    assert "does not hold image key" in expected
    assert shown_error(fresh_page) == expected


def test_oversized_upload_is_refused_by_the_page_and_by_its_server(fresh_page, page, tmp_path):
    import aiohttp

    limit = page.info()["max_image_bytes"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (limit + 1))
    submit(fresh_page, PROMPTS, upload=big)
    assert shown_error(fresh_page) == f"the image is {limit + 1} bytes; the limit is {limit} bytes"

    async def post() -> tuple:
        form = aiohttp.FormData()
        form.add_field("prompts", "zebra")
        form.add_field("image", b"\0" * (limit + 2 * 1024**2), filename="big.png")
        async with aiohttp.ClientSession() as session, session.post(page.url + "api/segment", data=form) as answer:
            return answer.status, await answer.json()

    status, body = asyncio.run(post())
    assert status == 413 and body["error"].endswith(f"the limit is {limit} bytes for the image")


def test_server_down_shows_a_readable_message(browser, tmp_path):
    from serving.server import free_ports
    from ui.browser import open_page
    from ui.launch import PageProcess

    grpc_port, http_port = free_ports(2)  # nothing listens there
    with PageProcess(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", tmp_path / "page.log") as down:
        open_page(browser, down.url)
        assert text_of(browser, "model-error").startswith(f"cannot reach the Triton server at 127.0.0.1:{grpc_port}")
        for protocol, port in (("grpc", grpc_port), ("http", http_port)):
            submit(browser, PROMPTS, sample="sample.jpg", protocol=protocol)
            assert shown_error(browser).startswith(f"cannot reach the Triton server at 127.0.0.1:{port} over {protocol}")


def test_screenshots_of_masks_and_of_an_error(browser, page, tmp_path):
    from ui.screenshots import capture

    written = capture(browser, page.url, tmp_path, "sample.jpg", PROMPTS)
    for path in written:
        with Image.open(path) as shot:
            assert shot.format == "PNG" and shot.width >= 800 and shot.height >= 600


def test_one_mask_is_drawn_as_upstream_draws_it():
    from ui.overlay import PALETTE, draw_masks

    rgb = decode_image((ASSETS / "sample.jpg").read_bytes())
    mask = (np.random.default_rng(0).random(rgb.shape[:2]) > 0.5).astype(np.uint8)
    assert np.array_equal(draw_masks(rgb, [mask], [PALETTE[0]]), upstream_overlay(rgb, mask))


def test_prompts_are_lines_and_blank_input_is_left_to_the_server():
    from ui.app import split_prompts

    assert split_prompts("zebra\r\n\n  the sky \n") == ["zebra", "  the sky "]
    assert split_prompts(" \n\n") == [""]
