"""Screenshots of the page for the docs: one with masks, one with an error (`make ui-screenshots`).

    python -m ui.screenshots --repository build/model_repository --output docs/screenshots \\
        [--sample demo_scene.png] [--prompt "zebra top left" --prompt ...]

Starts tritonserver on the repository and the page on free loopback ports, drives a headless
Chromium through the page (a shipped image and its prompts; then a text file uploaded as an image)
and writes `ui-masks.png` and `ui-error.png`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from .browser import HeadlessChromium, open_page, submit
from .launch import REPO_ROOT, PageProcess

MASKS_FILE = "ui-masks.png"
ERROR_FILE = "ui-error.png"
DEFAULT_PROMPTS = ["zebra top left", "the yellow sun", "red ball"]
NOT_AN_IMAGE = b"this is a text file, not an image\n"


def capture(browser: HeadlessChromium, url: str, output: Path, sample: str, prompts: Sequence[str]) -> List[Path]:
    """The two screenshots of the docs, written to `output`."""
    output.mkdir(parents=True, exist_ok=True)
    open_page(browser, url)
    submit(browser, prompts, sample=sample)
    masks = output / MASKS_FILE
    browser.full_page_screenshot(masks)
    with tempfile.TemporaryDirectory() as scratch:
        not_an_image = Path(scratch) / "not-an-image.png"
        not_an_image.write_bytes(NOT_AN_IMAGE)
        submit(browser, prompts, upload=not_an_image)
    error = output / ERROR_FILE
    browser.full_page_screenshot(error)
    return [masks, error]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.screenshots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository to serve")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "screenshots")
    parser.add_argument("--sample", default=None, help="shipped image (default: demo_scene.png if shipped, "
                                                       "else the first one)")
    parser.add_argument("--prompt", action="append", default=None, help="prompt; repeat for several")
    args = parser.parse_args(argv)
    from serving.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="evfsam-screenshots-") as logs, \
            TritonServer.on_free_ports(args.repository, log_file=Path(logs) / "tritonserver.log") as server, \
            PageProcess(server.grpc_url, server.http_url, Path(logs) / "page.log") as page, \
            HeadlessChromium() as browser:
        samples = page.info()["samples"]
        sample = args.sample or ("demo_scene.png" if "demo_scene.png" in samples else samples[0])
        written = capture(browser, page.url, args.output, sample, args.prompt or DEFAULT_PROMPTS)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
