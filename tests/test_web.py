"""The browser demo, `python -m stages.web`, on the default run's toy models (so `slow`): one server process on a
free loopback port for the whole file, driven in headless Chromium (tests/browser.py) as a user would (upload,
ask, the answer's phrases and the overlay, a click on a phrase changing the attention map shown, a
screenshot), and by plain HTTP requests for what a page never sends (paths out of the output folder, a
foreign Host header, an upload over the byte cap). Hostile uploads (a truncated PNG, a decompression bomb,
a text file, a file over the cap) each show an error in the page, and the server goes on serving."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import Browser
from PIL import Image
from test_workflow import chromium_or_skip

from stages.web import SESSION_HEADER, safe_name, served_file

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_BYTES = 200_000
MAX_PIXELS = 1_000_000


# --- the path check and names, without a server ------------------------------------------------------

def test_served_file_keeps_to_the_output_folder(tmp_path):
    out = tmp_path / "out"
    (out / "chat-001").mkdir(parents=True)
    (out / "chat-001" / "turn-0.png").write_bytes(b"png")
    (out / "notes.txt").write_text("not served")
    (tmp_path / "secret.png").write_bytes(b"outside")
    (out / "link.png").symlink_to(tmp_path / "secret.png")
    (out / "inside.png").symlink_to(out / "chat-001" / "turn-0.png")
    assert served_file(out, "chat-001/turn-0.png") == (out / "chat-001" / "turn-0.png").resolve()
    assert served_file(out, "inside.png") == (out / "chat-001" / "turn-0.png").resolve()
    for refused in ("../secret.png", "chat-001/../../secret.png", str(tmp_path / "secret.png"), "link.png",
                    "notes.txt", "chat-001", "chat-001//turn-0.png", "./chat-001/turn-0.png", "chat-001\\turn-0.png",
                    "missing.png", ""):
        assert served_file(out, refused) is None, refused
    assert [safe_name(name) for name in ("../../etc/passwd", "a b<c>.png", "..", "C:\\x\\y.jpg")] == \
        ["passwd", "a_b_c_.png", "image", "y.jpg"]


# --- the server ------------------------------------------------------------------------------------

@dataclass
class Server:
    """The demo's process, its URL (host and port) and its output folder."""

    process: subprocess.Popen
    log: Path
    out: Path
    host: str = ""
    port: int = 0

    def wait_until_serving(self, timeout: float = 120) -> None:
        """Read the process's output until it names its URL."""
        deadline = time.monotonic() + timeout
        seen = ""
        while not self.port:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"the demo did not start:\n{seen}\n{self.log.read_text()[-3000:]}")
            if select.select([self.process.stdout], [], [], 1.0)[0]:
                seen += os.read(self.process.stdout.fileno(), 65536).decode(errors="replace")
                if match := re.search(r"serving on http://([\d.]+):(\d+)/", seen):
                    self.host, self.port = match.group(1), int(match.group(2))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one request sent as is (the path not normalised)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def toy_files(default_run):
    """(the toy LLaVA folder, the toy SAM file, the test images) of the default run."""
    results = default_run / "results"
    return (results / "models" / "toy-llava", results / "models" / "toy-sam.safetensors",
            sorted((results / "synthetic" / "images").glob("*.jpg")))


@pytest.fixture(scope="module")
def server(toy_files, tmp_path_factory):
    """`python -m stages.web` on the toy models, port 0 (a free one), caps of MAX_UPLOAD_BYTES bytes and
    MAX_PIXELS pixels; started here, waited for by whoever needs its URL (:meth:`Server.wait_until_serving`),
    so that Chromium starts meanwhile."""
    lmm, sam, images = toy_files
    folder = tmp_path_factory.mktemp("web")
    log = folder / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "stages.web", "--config", str(ROOT / "config.yaml"), "--path", str(lmm),
             "--sam-checkpoint", str(sam), "--examples", str(images[0].parent), "--out", str(folder / "out"),
             "--port", "0", "--device", "cpu", "--seed", "0", "--max-new-tokens", "40",
             "--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--max-pixels", str(MAX_PIXELS)],
            cwd=folder, stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    demo = Server(process, log, folder / "out")
    yield demo
    process.send_signal(signal.SIGINT)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


@pytest.fixture(scope="module")
def page(server):
    """Headless Chromium showing the demo's page, ready."""
    executable = chromium_or_skip()
    with Browser(executable, width=1400, height=900, timeout=90) as browser:
        server.wait_until_serving()
        browser.open(server.url + "/")
        browser.wait_for("document.body.dataset.ready === '1'")
        yield browser


def choose_file(browser: Browser, path: Path) -> None:
    """Give ``path`` to the page's file input, as a user picking it does (its change event fires)."""
    node = browser.command("Runtime.evaluate", expression="document.getElementById('file')")["result"]
    browser.command("DOM.setFileInputFiles", files=[str(path)], objectId=node["objectId"])


def loaded(image_id: str) -> str:
    """JavaScript: the src of image element ``image_id`` once it has loaded and decoded, else false."""
    return (f"(() => {{ const i = document.getElementById({image_id!r}); "
            "return i.hasAttribute('src') && i.complete && i.naturalWidth > 0 && i.getAttribute('src'); })()")


def ask(browser: Browser, question: str) -> None:
    """Ask ``question`` in the page and wait for its answer to be rendered."""
    answers = browser.evaluate("document.querySelectorAll('.message.assistant:not(.streaming)').length")
    browser.evaluate(f"document.getElementById('question').value = {question!r}; "
                     "document.getElementById('send').click()")
    browser.wait_for(f"document.querySelectorAll('.message.assistant:not(.streaming)').length > {answers} && "
                     "document.body.dataset.busy === ''")


def error_shown(browser: Browser) -> str:
    return browser.wait_for("(() => { const e = document.getElementById('error'); "
                            "return !e.hidden && e.textContent; })()")


@pytest.mark.slow
def test_chat_in_the_browser(page, server, toy_files, tmp_path):
    """Upload a test image, ask: the answer streams in, its phrases are coloured spans, the overlay of the
    turn and the first phrase's attention map show; a click on another phrase shows that phrase's map (a
    different picture); "Download" gives a ZIP of the conversation's artifacts. A screenshot is kept."""
    _, _, images = toy_files
    choose_file(page, images[0])
    preview = page.wait_for(loaded("overlay"))
    assert re.fullmatch(r"/files/session-\w+/image-1\.png", preview), preview
    assert page.evaluate("document.getElementById('image-name').textContent") == images[0].name

    # The toy models' answers are short: ask until two phrases have a map (each turn's phrases stay clickable).
    for question in ("Describe the image in detail.", "What else is there?", "Describe it again."):
        ask(page, question)
        mapped = page.evaluate("[...document.querySelectorAll('.phrase:not(.unmapped)')].length")
        if mapped >= 2:
            break
    assert mapped >= 2, page.evaluate("document.getElementById('log').innerText")
    answer = page.evaluate("document.querySelector('.message.assistant:last-child').textContent")
    assert answer.strip(), "empty answer"
    overlay = page.wait_for(loaded("overlay"))
    assert re.fullmatch(r"/files/session-\w+/chat-001/turn-\d\.png", overlay), overlay
    first_map = page.wait_for(loaded("map"))
    assert re.fullmatch(r"/files/session-\w+/chat-001/turn-\d-phrase-\d+\.png", first_map), first_map

    # Click a phrase other than the one selected.
    page.evaluate("[...document.querySelectorAll('.phrase:not(.unmapped):not(.selected)')][0].click()")
    second_map = page.wait_for(f"(() => {{ const s = {loaded('map')}; return s !== {first_map!r} && s; }})()")
    assert page.evaluate("document.querySelectorAll('.phrase.selected').length") == 1
    assert "attention peak" in page.evaluate("document.getElementById('map-caption').textContent")
    maps = [server.request("GET", url) for url in (first_map, second_map)]
    assert [status for status, _ in maps] == [200, 200] and maps[0][1] != maps[1][1]
    assert Image.open(io.BytesIO(maps[1][1])).size == Image.open(io.BytesIO(server.request("GET", overlay)[1])).size

    screenshot = tmp_path / "web.png"
    screenshot.write_bytes(page.screenshot())
    assert len(Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 24)) > 100

    page.evaluate("document.getElementById('save').click()")
    link = page.wait_for("(() => { const a = document.getElementById('download'); return !a.hidden && "
                         "a.getAttribute('href'); })()")
    status, archive = server.request("GET", link)
    assert status == 200
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    stem = images[0].stem
    for name in ("manifest.parquet", "generations.parquet", "phrases.parquet", "masks.parquet", f"{stem}-0_overlay.png"):
        assert any(entry.endswith(f"-conversation-1/{name}") for entry in names), (name, names)
    assert any("/attention.zarr/" in entry for entry in names), names


def bomb_png(side: int) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` black pixels: tens of kilobytes that decode to ``side**2`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_hostile_uploads_are_errors_in_the_page_and_the_server_goes_on(page, server, toy_files, tmp_path):
    """A truncated PNG, a decompression bomb (20,000 x 20,000 pixels in 50 kB), a text file and a file over
    the byte cap: each is an error shown in the page, the conversation shown stays; then an example image
    and a question are answered."""
    _, _, images = toy_files
    good = io.BytesIO()
    Image.open(images[1]).save(good, format="PNG")
    hostile = {
        "truncated.png": (good.getvalue()[: len(good.getvalue()) * 2 // 3], r"truncated\.png.*(truncated|broken)"),
        "bomb.png": (bomb_png(20_000), r"bomb\.png is 20000 x 20000 = 400,000,000 pixels; .*at most 1,000,000"),
        "notes.txt": (b"not an image\n" * 10, r"unreadable image notes\.txt: cannot identify image file"),
        "huge.png": (b"\0" * (MAX_UPLOAD_BYTES + 1), r"huge\.png is larger than 200,000 bytes.*--max-upload-bytes"),
    }
    assert len(hostile["bomb.png"][0]) < 100_000
    shown = page.evaluate("document.getElementById('overlay').getAttribute('src')")
    for name, (data, message) in hostile.items():
        (tmp_path / name).write_bytes(data)
        page.evaluate("document.getElementById('error').hidden = true")
        choose_file(page, tmp_path / name)
        assert re.search(message, error_shown(page)), (name, error_shown(page))
        page.wait_for("document.body.dataset.busy === ''")
        assert page.evaluate("document.getElementById('overlay').getAttribute('src')") == shown
    # The byte cap holds for a request that does not come from the page (which checks the size first).
    session = page.evaluate("state.session")
    status, body = server.request("POST", "/api/upload?name=huge.png", hostile["huge.png"][0],
                                  {SESSION_HEADER: session})
    assert status == 413 and "--max-upload-bytes" in json.loads(body)["error"]

    page.evaluate("document.querySelector('#examples button').click()")
    page.wait_for(f"(() => {{ const s = {loaded('overlay')}; return s && s !== {shown!r}; }})()")
    assert page.evaluate("document.getElementById('error').hidden")
    ask(page, "Describe the image in detail.")
    assert page.wait_for(loaded("overlay")).endswith("/turn-0.png")
    assert server.process.poll() is None


@pytest.mark.slow
def test_no_file_outside_the_output_folder_is_served(server, tmp_path):
    """Plain HTTP: paths with .., encoded .., absolute paths, a symlink out of the folder, an upload as
    stored (a valid image) and a file type not served are all 404; a file of the folder is served; a request addressed to
    another host name (DNS rebinding) is refused; the API wants the page's session."""
    server.wait_until_serving()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the output folder")
    (server.out / "link.png").symlink_to(secret)
    (server.out / "notes.txt").write_text("not a type the demo serves")
    thumbnail = next((server.out / "examples").glob("*.png")).relative_to(server.out).as_posix()
    assert server.request("GET", f"/files/{thumbnail}")[0] == 200
    session = json.loads(server.request("POST", "/api/session")[1])["session"]
    status, body = server.request("POST", "/api/upload?name=up.png", (server.out / thumbnail).read_bytes(),
                                  {SESSION_HEADER: session})
    assert status == 200 and json.loads(body)["name"] == "up.png"
    uploads = [path.relative_to(server.out).as_posix() for path in server.out.glob(f"session-{session}/uploads/*/*")]
    assert [Path(upload).name for upload in uploads] == ["up.upload"]
    for path in ("/files/../config.yaml", "/files/%2e%2e/%2e%2e/etc/passwd", "/files/..%2fsecret.png",
                 f"/files/{secret}", f"/files//{secret}", "/files/link.png", "/files/notes.txt",
                 f"/files/{thumbnail}/..", "/static/../web.py", "/../stages/web.py",
                 *(f"/files/{upload}" for upload in uploads)):
        status, body = server.request("GET", path)
        assert status == 404 and b"outside" not in body, (path, status, body[:200])
    assert server.request("GET", "/", headers={"Host": "attacker.example:80"})[0] == 400
    status, body = server.request("POST", "/api/reset")
    assert status == 404 and "reload the page" in json.loads(body)["error"]
