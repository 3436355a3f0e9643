"""The page's web server (aiohttp): one static page, the shipped sample images, and a JSON API.

    GET  /                    the page (ui/static/index.html, app.js, style.css)
    GET  /samples/NAME        an image of the assets directory (JPEG / PNG files only)
    GET  /api/info            protocols offered, sample names, upload limits
    GET  /api/model?protocol  the served model's identity (checkpoint, sha256, family, recipe)
    POST /api/segment         multipart: `image` (a file) or `sample` (a name), `prompts` (one per
                              line), `protocol` ("grpc" | "http"), optional `image_key` (send the key
                              of the image instead of its bytes) -> masks drawn over the image, each
                              prompt's score and colour, the request's latency, cache hit, image key

The masks are drawn here (numpy, `ui.overlay`) and sent as one PNG; the page only shows it.  Every
failure of an API call is a JSON `{"error": one line}`: the client library's message for what the
Triton server refused, or why this server refused the upload; never a stack trace (an unexpected
exception is logged here and reported as "internal error").  The page inserts every text as text,
never as HTML, and the Content-Security-Policy allows no inline script.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

from aiohttp import web
from PIL import Image

from clients.errors import (ClientError, ContractMismatch, InvalidInput, RequestTimeout, ServerError,
                            ServerUnreachable)
from evfsam.processing import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, InvalidImage, decode_image
from evfsam.specs import MAX_PROMPTS_PER_REQUEST

from .backend import Answer, Backend
from .overlay import draw_masks, hex_colour, mask_colours

LOG = logging.getLogger("ui")
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
SAMPLE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
# The server's own default limits (README "Bad input contract"): an upload it would refuse for its
# size is refused here before it is sent; its pixel count is checked before it is decoded here.
IMAGE_LIMITS = ImageLimits(DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS)
# Besides the image, a form holds at most MAX_PROMPTS_PER_REQUEST prompts of <= 8 KiB and the framing.
FORM_OVERHEAD_BYTES = 1024**2
# One submission is one many-prompts request, so its latency is one request's.
MAX_PROMPTS = MAX_PROMPTS_PER_REQUEST
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
BACKEND_KEY = web.AppKey("backend", Backend)
SAMPLES_KEY = web.AppKey("samples_dir", Path)
DEFAULT_PROTOCOL_KEY = web.AppKey("default_protocol", str)


class UploadRefused(InvalidInput):
    """This server refuses the submission before anything is sent to Triton (HTTP `status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Submission:
    protocol: str
    image: bytes
    prompts: List[str]
    image_key: Optional[str]  # when set, Triton gets the key instead of the image bytes


def create_app(backend: Backend, samples_dir: Path, default_protocol: str) -> web.Application:
    if default_protocol not in backend.protocols:
        raise InvalidInput(f"default protocol {default_protocol!r} has no server URL")
    app = web.Application(client_max_size=IMAGE_LIMITS.max_bytes + FORM_OVERHEAD_BYTES,
                          middlewares=[json_errors])
    app[BACKEND_KEY] = backend
    app[SAMPLES_KEY] = samples_dir
    app[DEFAULT_PROTOCOL_KEY] = default_protocol
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/samples/{name}", sample_image)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/model", model)
    app.router.add_post("/api/segment", segment)
    app.on_response_prepare.append(add_security_headers)
    app.on_cleanup.append(close_backend)
    return app


# ----------------------------------------------------------------------------------------------------
# Routes.

async def page(request: web.Request) -> web.Response:
    return web.Response(body=(STATIC_DIR / "index.html").read_bytes(), content_type="text/html", charset="utf-8")


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.Response(body=(STATIC_DIR / name).read_bytes(), content_type=STATIC_FILES[name], charset="utf-8")


async def sample_image(request: web.Request) -> web.Response:
    path = sample_path(request.app[SAMPLES_KEY], request.match_info["name"])
    return web.Response(body=path.read_bytes(), content_type=SAMPLE_TYPES[path.suffix.lower()])


async def info(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    return web.json_response({
        "protocols": backend.protocols,
        "default_protocol": request.app[DEFAULT_PROTOCOL_KEY],
        "samples": sample_names(request.app[SAMPLES_KEY]),
        "max_image_bytes": IMAGE_LIMITS.max_bytes,
        "max_image_pixels": IMAGE_LIMITS.max_pixels,
        "max_prompts": MAX_PROMPTS,
    })


async def model(request: web.Request) -> web.Response:
    identity = await request.app[BACKEND_KEY].identity(request.query.get("protocol", ""))
    return web.json_response(identity.to_json())


async def segment(request: web.Request) -> web.Response:
    submission = await read_submission(request)
    answer = await request.app[BACKEND_KEY].segment(
        submission.protocol, None if submission.image_key else submission.image, submission.image_key,
        submission.prompts)
    payload = await asyncio.get_running_loop().run_in_executor(None, render_answer, submission, answer)
    return web.json_response(payload)


# ----------------------------------------------------------------------------------------------------
# The submission and the answer.

async def read_submission(request: web.Request) -> Submission:
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        size = f"{request.content_length} bytes" if request.content_length else "too large"
        raise UploadRefused(f"the upload is {size}; the limit is {IMAGE_LIMITS.max_bytes} bytes for the image",
                            status=413) from None
    protocol = str(form.get("protocol") or request.app[DEFAULT_PROTOCOL_KEY])
    image = await submitted_image(form, request.app[SAMPLES_KEY])
    key = str(form.get("image_key") or "").strip() or None
    return Submission(protocol, image, split_prompts(str(form.get("prompts") or "")), key)


async def submitted_image(form: Any, samples_dir: Path) -> bytes:
    upload, sample = form.get("image"), str(form.get("sample") or "")
    if isinstance(upload, web.FileField):
        data = upload.file.read()
    elif sample:
        data = sample_path(samples_dir, sample).read_bytes()
    else:
        raise UploadRefused("choose an image: upload one or pick a sample")
    if len(data) > IMAGE_LIMITS.max_bytes:
        raise UploadRefused(f"the image is {len(data)} bytes; the limit is {IMAGE_LIMITS.max_bytes} bytes", status=413)
    return data


def split_prompts(text: str) -> List[str]:
    """One prompt per line; blank lines are dropped.  With nothing but blanks the one prompt "" is
    sent, so that the server's own rule (and message) decides."""
    prompts = [line for line in text.splitlines() if line.strip()] or [""]
    if len(prompts) > MAX_PROMPTS:
        raise UploadRefused(f"{len(prompts)} prompts; the page sends at most {MAX_PROMPTS} at a time")
    return prompts


def render_answer(submission: Submission, answer: Answer) -> Dict[str, Any]:
    """The JSON the page shows: the masks drawn over the image (PNG, base64) and one entry per prompt."""
    try:
        rgb = decode_image(submission.image, IMAGE_LIMITS)  # as the server decoded it: masks fit pixel for pixel
    except InvalidImage as exc:
        raise UploadRefused(f"the image cannot be drawn here: {exc}") from None
    masks = [s.mask for s in answer.segmentations]
    for mask in masks:
        if mask.shape != rgb.shape[:2]:
            raise UploadRefused(f"the server's masks are {mask.shape[1]}x{mask.shape[0]} but the image is "
                                f"{rgb.shape[1]}x{rgb.shape[0]}: the image key belongs to another image")
    colours = mask_colours(len(masks))
    first = answer.segmentations[0]
    return {
        "protocol": submission.protocol,
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        "overlay_png": base64.b64encode(png_bytes(draw_masks(rgb, masks, colours))).decode("ascii"),
        "latency_ms": round(answer.latency_s * 1000.0, 1),
        "cache_hit": first.cache_hit,
        "image_key": first.image_key,
        "sent_image_key": submission.image_key is not None,
        "model": answer.identity.to_json(),
        "masks": [
            {"prompt": s.prompt, "score": s.score, "colour": hex_colour(colour),
             "area_fraction": s.area / float(s.mask.size)}
            for s, colour in zip(answer.segmentations, colours)
        ],
    }


def png_bytes(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# Samples, errors, headers.

def sample_names(samples_dir: Path) -> List[str]:
    """The JPEG / PNG files directly in `samples_dir`, by name (read on every call: new ones show up)."""
    if not samples_dir.is_dir():
        return []
    return sorted(p.name for p in samples_dir.iterdir() if p.is_file() and p.suffix.lower() in SAMPLE_TYPES)


def sample_path(samples_dir: Path, name: str) -> Path:
    """A listed sample only: a name that is not one (a path, `..`) is an unknown sample."""
    if name not in sample_names(samples_dir):
        raise UploadRefused(f"there is no sample image named {name[:80]!r}", status=404)
    return samples_dir / name


# What each failure is in HTTP: this server refused it (its own 4xx), Triton did, or Triton did not answer.
ERROR_STATUSES = ((InvalidInput, 400), (RequestTimeout, 504), (ServerUnreachable, 502), (ContractMismatch, 502),
                  (ServerError, 502))


def error_status(exc: ClientError) -> int:
    if isinstance(exc, UploadRefused):
        return exc.status
    return next((status for kind, status in ERROR_STATUSES if isinstance(exc, kind)), 502)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """API failures as `{"error": one line}`; other pages keep aiohttp's plain error pages."""
    try:
        return await handler(request)
    except ClientError as exc:
        if not request.path.startswith("/api/") and not request.path.startswith("/samples/"):
            raise web.HTTPNotFound() from None
        return web.json_response({"error": str(exc)}, status=error_status(exc))
    except web.HTTPException:
        raise
    except Exception:  # a defect here: the log gets the traceback, the page one line
        LOG.exception("%s %s failed", request.method, request.path)
        if not request.path.startswith("/api/"):
            raise web.HTTPInternalServerError() from None
        return web.json_response({"error": "internal error in the page's server (its log has the details)"},
                                 status=500)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


async def close_backend(app: web.Application) -> None:
    await app[BACKEND_KEY].close()
