"""Chat with a model about an image in the browser, every answer grounded: ``python -m stages.web``.

The browser front end of :mod:`stages.conversation` (the core :mod:`stages.chat` drives in a terminal):
upload an image or pick one of the examples (the images of the config's data sets: with ``config.yaml``
the toy world's), ask, and the answer streams in; then each noun phrase of the answer is coloured as
its SAM mask is on the image beside it, and hovering over a phrase (or clicking it, which keeps it)
shows the phrase's attention map with its peak, the point that prompted SAM. The conversation is kept
across turns until a new image or "New conversation"; a slider sets the temperature of each answer
(0: greedy); "Download" zips the conversation's artifacts (:meth:`~stages.conversation.Conversation.save`:
the pipeline's own tables, attention store and overlays).

Models and settings come from a workflow config and the same options as ``python -m stages.chat``
(``--family``, ``--path``, ``--base``, ``--sam-checkpoint``, ...); with the default ``config.yaml`` that is
the toy LLaVA and toy SAM that ``make run`` trains, offline. The server needs the ``demo`` extra
(``pip install -e '.[demo]'``: Starlette and Uvicorn).

Safe by default:

- it listens on 127.0.0.1 (``--host`` to change that; a warning says when the address is reachable from
  the network) and, on loopback, answers only requests addressed to ``localhost``/``127.0.0.1`` (DNS
  rebinding); the API asks for a session header a cross-site form cannot send;
- it serves its page, its two static files and, under ``/files/``, regular files of its output folder
  ``--out`` only, of a few types (PNG, ZIP): a path with ``..``, an absolute path or a symlink leading
  out of the folder is refused (404); an uploaded file itself is never served, only a PNG of its
  decoded pixels;
- an upload larger than ``--max-upload-bytes`` is refused before it is read whole (413), an image of more
  than ``--max-pixels`` pixels before it is decoded (from its header: a decompression bomb never
  expands), and a truncated or unreadable file or a non-image is refused with the reason
  (:func:`stages.io.images.load_rgb_image`); each is a message in the page, and the server goes on;
- the model runs one request at a time: every request that touches a conversation waits in one queue
  (a single worker thread, first come first served); the page says how many are ahead.

Each browser page is a session with its own conversation and folder ``<out>/<session>/`` (uploads,
overlays, attention maps, saved conversations); the :data:`MAX_SESSIONS` most recent are kept in
memory, their folders on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import logging
import re
import secrets
import shutil
import socket
import sys
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from stages.chat import DEFAULT_CONFIG, add_model_options, chat_config
from stages.config import ConfigError, read_sections
from stages.conversation import ChatError, Conversation, Sampling, Turn
from stages.io.images import ImageError, image_size, load_rgb_array
from stages.visualize import HEAT_WEIGHT, PALETTE, heatmap

if TYPE_CHECKING:
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from stages.conversation import ChatModels

log = logging.getLogger("stages.web")   # also when run as __main__

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_OUT = "web"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 25_000_000
MAX_EXAMPLES = 12
MAX_SESSIONS = 16
MAX_QUESTION_CHARS = 4000
MAX_JSON_BYTES = 64 * 2**10
THUMBNAIL_SIDE = 128
PREVIEW_SIDE = 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What /files/ serves, by suffix: nothing else of the output folder is sent.
CONTENT_TYPES = {".png": "image/png", ".zip": "application/zip"}
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]
STATIC = Path(__file__).with_name("web_static")
STATIC_FILES = {"web.js": "text/javascript; charset=utf-8", "web.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
SESSION_HEADER = "X-Session"


class RequestError(ValueError):
    """A request the demo refuses; ``status`` is its HTTP status, the message what the page shows."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one upload may be: at most ``max_upload_bytes`` bytes and ``max_pixels`` pixels (width x height)."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass
class Session:
    """One browser page's conversation: its folder ``<out>/session-<id>``, the stop flag of its answer, the
    decoded image (``image_rgb``, (H, W, 3) uint8) and counters naming its uploads and saves."""

    id: str
    folder: Path
    conversation: Conversation
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    image_rgb: np.ndarray | None = None
    images: int = 0
    saves: int = 0


def safe_name(name: str, default: str = "image") -> str:
    """``name``'s last path component with every character but letters, digits, ``.``, ``_`` and ``-``
    replaced by ``_``, no leading dot, at most 64 characters; ``default`` when nothing is left."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")[:64]
    return base or default


def served_file(root: Path, relative: str) -> Path | None:
    """The file that ``/files/<relative>`` names under the output folder ``root``, or None when it is
    not one to serve: an empty, absolute or backslashed path, one with an empty, ``.`` or ``..``
    component, a NUL byte, a suffix not in :data:`CONTENT_TYPES`, a path that does not resolve (symlinks
    followed) to a regular file inside ``root``."""
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts) or Path(parts[-1]).suffix.lower() not in CONTENT_TYPES:
        return None
    try:
        root = root.resolve(strict=True)
        path = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def example_images(folders: Sequence[Path], limit: int = MAX_EXAMPLES) -> list[Path]:
    """The first ``limit`` image files (by suffix, :data:`IMAGE_SUFFIXES`) of ``folders``, each folder's
    sorted by name."""
    found: list[Path] = []
    for folder in folders:
        found += sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    return found[:limit]


def config_image_folders(config_path: str | None) -> list[Path]:
    """The existing ``images`` folders of the config's data sets, in order, each once (none without a
    config)."""
    if config_path is None:
        return []
    folders: list[Path] = []
    for entry in (read_sections(config_path).get("datasets") or {}).values():
        images = entry.get("images") if isinstance(entry, dict) else None
        if isinstance(images, str) and Path(images).is_dir() and Path(images) not in folders:
            folders.append(Path(images))
    return folders


def hex_colour(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def phrase_maps(turn: Turn, segment_cfg: Any) -> dict[int, torch.Tensor]:
    """Phrase index -> the phrase's map on the feature grid, float32 (grid_h, grid_w), as the segment stage
    computes it before upsampling it and taking its maximum as SAM's point (its tokens' centred rows, as
    float16 as the store keeps them, pooled by ``segment.pool``, corners removed with
    ``segment.remove_corner``; :mod:`stages.segment`). Phrases with an error, no token or a non-finite row
    have none."""
    import torch

    from stages.segment import centre_rows, pool_phrase, remove_corners

    rows = torch.from_numpy(turn.rows.astype(np.float16).astype(np.float32))
    centred, finite = centre_rows(rows)
    usable = [phrase for phrase in turn.phrases
              if phrase["error"] is None and phrase["phrase_index"] is not None and phrase["token_indices"] is not None
              and len(phrase["token_indices"]) and all(bool(finite[j]) for j in phrase["token_indices"])]
    if not usable:
        return {}
    pooled = torch.stack([pool_phrase(centred, phrase["token_indices"], segment_cfg.pool) for phrase in usable])
    if segment_cfg.remove_corner:
        pooled = remove_corners(pooled)
    return {int(phrase["phrase_index"]): grid_map for phrase, grid_map in zip(usable, pooled)}


def render_attention(image_rgb: np.ndarray, grid_map: torch.Tensor, upsample: str, point: tuple[float, float] | None,
                     colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    """A phrase's attention map over the image, ``size`` (width, height; the overlay's) pixels: the grid map
    upsampled to that size as the segment stage upsamples it to the image (``upsample``: pad, crop or
    original; :func:`stages.segment.upsample_map`), in heat colours (:func:`stages.visualize.heatmap`) over
    the greyscale image (weight :data:`~stages.visualize.HEAT_WEIGHT`), with ``point`` (pixel (x, y) of the
    image) marked in ``colour``. Memory: a few arrays of ``size``, whatever the image's size."""
    from stages.segment import upsample_map

    width = image_rgb.shape[1]
    resample = Image.Resampling.NEAREST if size[0] >= width else Image.Resampling.LANCZOS
    grey = np.asarray(Image.fromarray(image_rgb).convert("L").resize(size, resample), dtype=np.float32)[..., None]
    heat = heatmap(upsample_map(grid_map, size[1], size[0], upsample).numpy()).astype(np.float32)
    blended = (1 - HEAT_WEIGHT) * grey + HEAT_WEIGHT * heat
    canvas = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    if point is not None:
        scale = size[0] / width
        x, y = (point[0] + 0.5) * scale - 0.5, (point[1] + 0.5) * scale - 0.5
        draw = ImageDraw.Draw(canvas)
        draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=colour, outline="white", width=2)
        draw.ellipse((x - 9, y - 9, x + 9, y + 9), outline="black", width=1)
    return canvas


def zip_folder(folder: Path, archive: Path) -> None:
    """Write every file under ``folder`` into the ZIP ``archive`` (paths relative to ``folder``'s parent),
    through a temporary name."""
    partial = archive.with_name(archive.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zipped.write(path, path.relative_to(folder.parent).as_posix())
    partial.replace(archive)


class Demo:
    """The server's state: the models, the output folder ``out``, the example images, the sessions, and
    the one worker thread every request that touches a conversation runs on, in order of arrival."""

    def __init__(self, models: ChatModels, out: Path, examples: Sequence[Path], sampling: Sampling,
                 limits: Limits = Limits()):
        self.models = models
        self.out = out.resolve()
        self.sampling = sampling
        self.limits = limits
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.out.mkdir(parents=True, exist_ok=True)
        self.examples: dict[str, tuple[Path, str]] = {}     # name -> (image file, URL of its thumbnail)
        thumbnails = self.out / "examples"
        thumbnails.mkdir(exist_ok=True)
        for number, path in enumerate(examples):
            if path.name in self.examples:
                log.warning("example skipped: %s has the name of an earlier one", path)
                continue
            try:
                width, height = image_size(path)
                if width * height > limits.max_pixels:
                    raise ImageError(f"{path} has {width * height:,} pixels, over --max-pixels")
                image = Image.fromarray(load_rgb_array(path))
            except ImageError as exc:
                log.warning("example skipped: %s", exc)
                continue
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            thumbnail = thumbnails / f"{number}-{safe_name(path.stem)}.png"
            image.save(thumbnail)
            self.examples[path.name] = (path, self.url(thumbnail))

    # -- the queue ------------------------------------------------------------------------------

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Queue ``function(*args)`` on the worker thread."""
        with self._pending_lock:
            self._pending += 1

        def job() -> Any:
            try:
                return function(*args)
            finally:
                with self._pending_lock:
                    self._pending -= 1

        return self._worker.submit(job)

    def pending(self) -> int:
        """How many requests are queued or running."""
        with self._pending_lock:
            return self._pending

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` on the worker thread, awaited."""
        return await asyncio.wrap_future(self.submit(function, *args))

    def close(self) -> None:
        """Drop the queued requests and stop the answer being generated."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        for session in self.sessions.values():
            session.stop.set()

    # -- sessions -------------------------------------------------------------------------------

    def new_session(self) -> Session:
        """A new session (the oldest dropped beyond :data:`MAX_SESSIONS`; its folder stays)."""
        ident = secrets.token_hex(8)
        folder = self.out / f"session-{ident}"
        folder.mkdir()
        session = Session(ident, folder, Conversation(self.models, folder))
        self.sessions[ident] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session

    def session(self, ident: str | None) -> Session:
        """The session ``ident``; RequestError (404) for an unknown one."""
        session = self.sessions.get(ident or "")
        if session is None:
            raise RequestError("this page's session is gone (the server restarted or dropped it): reload the page",
                               404)
        self.sessions.move_to_end(session.id)
        return session

    def url(self, path: Path) -> str:
        """The URL under ``/files/`` of ``path``, a file of the output folder."""
        return "/files/" + path.relative_to(self.out).as_posix()

    # -- work on the worker thread --------------------------------------------------------------

    def set_upload(self, session: Session, name: str, data: bytes) -> dict[str, Any]:
        """Store an uploaded file in the session's folder and start a conversation about it; ImageError
        (the file removed again) when it is not an image this demo takes."""
        if not data:
            raise ImageError(f"{name or 'the upload'} is empty")
        session.images += 1
        # Suffix .upload: never served (CONTENT_TYPES); its stem names the conversation's samples.
        path = session.folder / "uploads" / str(session.images) / f"{Path(safe_name(name, 'upload')).stem}.upload"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        try:
            return self.set_image(session, path, name or path.name)
        except ImageError:
            shutil.rmtree(path.parent)
            raise

    def set_example(self, session: Session, name: str) -> dict[str, Any]:
        """Start a conversation about the example ``name`` (RequestError for a name not offered)."""
        if name not in self.examples:
            raise RequestError(f"no example image named {name!r}", 404)
        session.images += 1
        return self.set_image(session, self.examples[name][0], name)

    def set_image(self, session: Session, path: Path, shown: str) -> dict[str, Any]:
        """Check the image's pixel count from its header, then decode it and start a new conversation
        (the current one is kept when this fails: ImageError naming ``shown``, not the server's path)."""
        try:
            width, height = image_size(path)
            if width * height > self.limits.max_pixels:
                raise ImageError(f"{shown} is {width} x {height} = {width * height:,} pixels; this demo takes "
                                 f"images of at most {self.limits.max_pixels:,} pixels (--max-pixels)")
            session.conversation.set_image(path)
            image_rgb = load_rgb_array(path)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(path), shown)) from None
        session.image_rgb = image_rgb
        preview = Image.fromarray(image_rgb)
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        preview_path = session.folder / f"image-{session.images}.png"
        preview.save(preview_path)
        return {"image": self.url(preview_path), "name": shown, "width": width, "height": height}

    def reset(self, session: Session) -> None:
        session.conversation.reset()

    def answer(self, session: Session, question: str, sampling: Sampling,
               on_token: Callable[[int, str], None]) -> dict[str, Any]:
        """Ask ``question`` (streaming to ``on_token``) and describe the turn for the page: the answer,
        its overlay's URL and each phrase with its span of the answer, colour, attention peak, mask score
        and the URL of its attention map (written beside the overlay)."""
        turn = session.conversation.ask(question, sampling, on_token=on_token, stop=session.stop)
        with Image.open(turn.overlay) as overlay:
            overlay_size = overlay.size
        maps = phrase_maps(turn, self.models.segment_cfg)
        masks: dict[int, dict[str, Any]] = {}
        notes = []
        for row in turn.masks:
            if row["phrase_index"] is None:
                notes.append(row["error"])
            else:
                masks.setdefault(int(row["phrase_index"]), row)
        phrases = []
        for phrase in turn.phrases:
            if phrase["phrase_index"] is None:
                notes.append(phrase["error"])
                continue
            index = int(phrase["phrase_index"])
            colour = PALETTE[index % len(PALETTE)]
            mask = masks.get(index, {})
            point = ((float(mask["point_x"]), float(mask["point_y"]))
                     if mask.get("point_x") is not None and mask.get("point_y") is not None else None)
            map_url = None
            if index in maps:
                map_path = turn.overlay.with_name(f"{turn.overlay.stem}-phrase-{index}.png")
                render_attention(session.image_rgb, maps[index], self.models.segment_cfg.upsample, point, colour,
                                 overlay_size).save(map_path)
                map_url = self.url(map_path)
            phrases.append({
                "index": index, "text": phrase["text"], "start": _integer(phrase["chunk_start"]),
                "end": _integer(phrase["chunk_end"]),
                "colour": hex_colour(colour), "point": point, "map": map_url,
                "score": float(mask["score"]) if mask.get("score") is not None else None,
                "error": phrase["error"] or mask.get("error")})
        return {"index": turn.index, "question": turn.question, "answer": turn.answer,
                "finish_reason": turn.finish_reason, "temperature": turn.sampling.temperature,
                "overlay": self.url(turn.overlay), "phrases": phrases, "notes": [n for n in notes if n]}

    def save(self, session: Session) -> dict[str, Any]:
        """Save the conversation (:meth:`Conversation.save`) into the session's folder and zip it."""
        session.saves += 1
        name = f"{safe_name(session.conversation.image_id or 'conversation')}-conversation-{session.saves}"
        folder = session.folder / "saved" / name
        session.conversation.save(folder)
        archive = folder.with_suffix(".zip")
        zip_folder(folder, archive)
        return {"url": self.url(archive), "name": archive.name, "turns": len(session.conversation.turns)}


def _integer(value: Any) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------
# The web application


def create_app(demo: Demo, *, allowed_hosts: Sequence[str] | None) -> Starlette:
    """The Starlette application of ``demo``; ``allowed_hosts``: the Host header values it answers (None:
    any)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(exc: Exception, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", status))

    async def read_json(request: Request) -> dict[str, Any]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise RequestError(f"request body over {MAX_JSON_BYTES} bytes", 413)
        try:
            value = json.loads(body or b"{}")
        except ValueError:
            raise RequestError("the request body is not JSON") from None
        if not isinstance(value, dict):
            raise RequestError("the request body must be a JSON object")
        return value

    def api(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """An API endpoint: its session from the header, its refusals as JSON errors, any other failure
        logged and reported without stopping the server."""
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestError, ChatError, ImageError) as exc:
                return error(exc)
            except Exception as exc:
                log.exception("request %s failed", request.url.path)
                return error(RuntimeError(f"the server failed: {type(exc).__name__}: {exc}"), 500)
        return endpoint

    def session_of(request: Request) -> Session:
        return demo.session(request.headers.get(SESSION_HEADER))

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return Response("not found", status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    async def files(request: Request) -> Response:
        path = served_file(demo.out, request.path_params["path"])
        if path is None:
            return Response("not found", status_code=404, media_type="text/plain")
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        if path.suffix.lower() == ".zip":
            headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix.lower()], headers=headers)

    async def new_session(request: Request) -> Response:
        session = demo.new_session()
        cfg = demo.models.cfg
        return JSONResponse({
            "session": session.id, "header": SESSION_HEADER,
            "model": f"{cfg.lmm.family} {cfg.lmm.path}" + (f" (base {cfg.lmm.base})" if cfg.lmm.base else ""),
            "sam": cfg.sam.type if demo.models.predictor is not None else None,
            "conv_mode": demo.models.conv_mode, "temperature": demo.sampling.temperature,
            "top_p": demo.sampling.top_p, "seed": demo.sampling.seed, "max_new_tokens": demo.sampling.max_new_tokens,
            "max_upload_bytes": demo.limits.max_upload_bytes, "max_pixels": demo.limits.max_pixels,
            "examples": [{"name": name, "thumbnail": url} for name, (_, url) in demo.examples.items()]})

    async def upload(request: Request) -> Response:
        session = session_of(request)
        name = request.query_params.get("name", "")
        cap = demo.limits.max_upload_bytes
        too_large = RequestError(f"{name or 'the file'} is larger than {cap:,} bytes, the most this demo takes "
                                 "(--max-upload-bytes)", 413)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > cap:
                raise too_large
        return JSONResponse(await demo.run(demo.set_upload, session, name, bytes(data)))

    async def example(request: Request) -> Response:
        session = session_of(request)
        name = (await read_json(request)).get("name")
        return JSONResponse(await demo.run(demo.set_example, session, str(name)))

    async def reset(request: Request) -> Response:
        session = session_of(request)
        await demo.run(demo.reset, session)
        return JSONResponse({"reset": True})

    async def stop(request: Request) -> Response:
        session_of(request).stop.set()
        return JSONResponse({"stopping": True})

    async def save(request: Request) -> Response:
        session = session_of(request)
        return JSONResponse(await demo.run(demo.save, session))

    async def ask(request: Request) -> Response:
        """The answer as a stream of JSON lines: ``{"queued": n}`` when n requests are ahead, one
        ``{"token": text}`` per generated token, then ``{"turn": ...}`` (:meth:`Demo.answer`) or
        ``{"error": message}``. A page that goes away stops its answer."""
        session = session_of(request)
        body = await read_json(request)
        question = str(body.get("question") or "")
        if len(question) > MAX_QUESTION_CHARS:
            raise RequestError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
        try:
            temperature = float(body.get("temperature", demo.sampling.temperature))
            sampling = dataclasses.replace(demo.sampling, temperature=temperature)
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def emit(event: dict[str, Any] | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        session.stop.clear()
        ahead = demo.pending()
        future = demo.submit(demo.answer, session, question, sampling, lambda token_id, text: emit({"token": text}))
        future.add_done_callback(lambda done: emit(None))

        async def lines():
            try:
                if ahead:
                    yield json.dumps({"queued": ahead}) + "\n"
                while (event := await events.get()) is not None:
                    yield json.dumps(event) + "\n"
                try:
                    yield json.dumps({"turn": future.result()}) + "\n"
                except (ChatError, ImageError, OSError) as exc:
                    yield json.dumps({"error": str(exc)}) + "\n"
                except Exception as exc:
                    log.exception("answer failed")
                    yield json.dumps({"error": f"the server failed: {type(exc).__name__}: {exc}"}) + "\n"
            finally:
                if not future.done():
                    session.stop.set()

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/files/{path:path}", files),
        Route("/api/session", new_session, methods=["POST"]),
        Route("/api/upload", api(upload), methods=["POST"]),
        Route("/api/example", api(example), methods=["POST"]),
        Route("/api/ask", api(ask), methods=["POST"]),
        Route("/api/stop", api(stop), methods=["POST"]),
        Route("/api/reset", api(reset), methods=["POST"]),
        Route("/api/save", api(save), methods=["POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.web", description=__doc__.split("\n\n")[0])
    add_model_options(parser, config_help="workflow config giving the model sections and the example images' "
                                          f"folders (default: {DEFAULT_CONFIG} when it exists, else the schema's "
                                          "defaults)",
                      temperature_help="the page's initial temperature (0: greedy); default 0.2 (the release's CLI)",
                      seed_help="seed of the sampled answers (default: a random one, shown in the page)")
    parser.add_argument("--examples", action="append", default=None, metavar="FOLDER",
                        help="a folder of images offered as examples (repeatable; default: the config's data "
                             f"sets' image folders); the first {MAX_EXAMPLES} are shown")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"the output folder: uploads, overlays, maps, saved conversations; the only folder "
                             f"whose files are served (default: {DEFAULT_OUT}/)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 makes the "
                             "demo reachable from the network: anyone who reaches it can use the model)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    parser.add_argument("--max-upload-bytes", type=int, default=MAX_UPLOAD_BYTES,
                        help=f"largest upload in bytes (default {MAX_UPLOAD_BYTES})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image in pixels, width x height (default {MAX_PIXELS})")
    return parser.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port) and listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import uvicorn
    except ImportError:
        print("error: the browser demo needs the demo extra: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=seed,
                            max_new_tokens=args.max_new_tokens)
        limits = Limits(args.max_upload_bytes, args.max_pixels)
        cfg = chat_config(args)
        config_path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
        folders = ([Path(folder) for folder in args.examples] if args.examples is not None
                   else config_image_folders(config_path))
        for folder in folders:
            if not folder.is_dir():
                raise ConfigError(f"examples folder not found: {folder}")
        sock = listening_socket(args.host, args.port)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    loopback = is_loopback(host)
    if not loopback:
        log.warning("listening on %s, reachable from the network: anyone who can reach port %d can use the model, "
                    "upload images and download what it wrote; --host 127.0.0.1 keeps it on this machine", host, port)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        from stages.conversation import ChatModels

        models = ChatModels(cfg)
        demo = Demo(models, Path(args.out), example_images(folders), sampling, limits)
    except (ConfigError, ValueError, OSError) as exc:
        sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(demo, allowed_hosts=LOOPBACK_NAMES if loopback else None)
    shown = f"[{host}]" if ":" in host else host
    print(f"{cfg.lmm.family} {cfg.lmm.path} ({models.conv_mode} conversation, seed {seed}); "
          f"{len(demo.examples)} example images; files in {demo.out}/", flush=True)
    print(f"serving on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
