"""Civitai lookup by hash (``library --civitai-lookup``) against a local server that answers like Civitai's API:
127.0.0.1 on a random port, in a thread, stopped by the fixture. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lora_factories import demo_or_random_pipeline, write_kohya_lora
from lora_studio.cli.main import main
from lora_studio.library import ScanCache, gather_folders, scan_models
from lora_studio.library.civitai import USER_AGENT, lookup_civitai

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class FakeCivitai(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.known: dict[str, dict] = {}
        self.requests: list[str] = []
        self.agents: set[str] = set()
        self.limit_next = 0          # answer this many requests with 429 first
        self.retry_after = "0"
        self.image_type = "image/png"
        self.image = PNG

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    timeout = 5

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv: FakeCivitai = self.server
        srv.requests.append(self.path)
        srv.agents.add(self.headers.get("User-Agent", ""))
        if srv.limit_next > 0:
            srv.limit_next -= 1
            return self._send(429, b'{"error":"Too Many Requests"}', "application/json",
                              {"Retry-After": srv.retry_after})
        prefix = "/api/v1/model-versions/by-hash/"
        if self.path.startswith(prefix) and self.path[len(prefix):] in srv.known:
            return self._send(200, json.dumps(srv.known[self.path[len(prefix):]]).encode(), "application/json")
        if self.path == "/images/first.png":
            return self._send(200, srv.image, srv.image_type)
        self._send(404, b'{"error":"Model not found"}', "application/json")


@pytest.fixture
def civitai():
    server = FakeCivitai()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two LoRA files (written once, copied into each test's folder)."""
    base = tmp_path_factory.mktemp("civitai-src")
    pipe = demo_or_random_pipeline()
    return {name: write_kohya_lora(base / f"{name}.safetensors", pipe, rank=2, te=False, seed=seed)
            for seed, name in enumerate(("known", "unknown"))}


def _folder(tmp_path, loras):
    folder = tmp_path / "Lora"
    folder.mkdir()
    for name, src in loras.items():
        (folder / f"{name}.safetensors").write_bytes(src.read_bytes())
    return folder


def _info(server: FakeCivitai) -> dict:
    return {"id": 7, "name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["known style, bold"],
            "model": {"name": "Known LoRA", "type": "LORA"},
            "images": [{"url": f"{server.url}/videos/first.mp4", "type": "video"},
                       {"url": f"{server.url}/images/first.png", "type": "image"}]}


def _cli(folder, cache, *extra, capsys):
    code = main(["library", "--lora-dir", str(folder), "--cache", str(cache), "--json", *extra])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_lookup_writes_info_and_preview_and_the_scan_reports_them(civitai, loras, tmp_path, capsys):
    folder = _folder(tmp_path, loras)
    sha = hashlib.sha256((folder / "known.safetensors").read_bytes()).hexdigest()
    civitai.known[sha] = _info(civitai)
    code, data, err = _cli(folder, tmp_path / "cache.json", "--civitai-lookup", "--civitai-url", civitai.url,
                           capsys=capsys)
    assert code == 0, err
    assert json.loads((folder / "known.civitai.info").read_text()) == _info(civitai)  # the same JSON
    assert (folder / "known.preview.png").read_bytes() == PNG
    assert not (folder / "unknown.civitai.info").exists()
    assert sorted(p for p in folder.iterdir() if p.name.startswith("unknown")) == [folder / "unknown.safetensors"]
    known = next(e for e in data["loras"] if e["name"] == "known")
    assert known["civitai"] == {"model_name": "Known LoRA", "version_name": "v1.0", "base_model": "SD 1.5"}
    assert known["preview"] == str(folder / "known.preview.png")
    assert {"known style", "bold"} <= set(known["trigger_words"])
    assert "not on Civitai" in err and "Known LoRA" in err
    assert civitai.agents == {USER_AGENT} and "LoRA-Studio" in USER_AGENT
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]


def test_without_the_flag_nothing_is_sent(civitai, loras, tmp_path, capsys):
    folder = _folder(tmp_path, loras)
    code, data, _ = _cli(folder, tmp_path / "cache.json", "--civitai-url", civitai.url, capsys=capsys)
    assert code == 0 and len(data["loras"]) == 2
    assert civitai.requests == []


def test_a_404_is_remembered_until_retry(civitai, loras, tmp_path, capsys):
    folder, cache = _folder(tmp_path, loras), tmp_path / "cache.json"
    _cli(folder, cache, "--civitai-lookup", "--civitai-url", civitai.url, capsys=capsys)
    assert len(civitai.requests) == 2   # neither is known
    code, _, err = _cli(folder, cache, "--civitai-lookup", "--civitai-url", civitai.url, capsys=capsys)
    assert code == 0 and len(civitai.requests) == 2 and "asked before" in err
    sha = hashlib.sha256((folder / "known.safetensors").read_bytes()).hexdigest()
    civitai.known[sha] = _info(civitai)
    _cli(folder, cache, "--civitai-lookup", "--civitai-retry", "--civitai-url", civitai.url, capsys=capsys)
    assert len(civitai.requests) == 2 + 2 + 1  # both asked again, and the preview of the one now known
    assert (folder / "known.civitai.info").is_file()
    _cli(folder, cache, "--civitai-lookup", "--civitai-url", civitai.url, capsys=capsys)
    assert len(civitai.requests) == 5   # one has its sidecar, the other is remembered


def test_rate_limit_waits_per_retry_after_then_gives_up(civitai, loras, tmp_path):
    folder = _folder(tmp_path, loras)
    cache = ScanCache(tmp_path / "cache.json")
    library = scan_models(gather_folders(lora_dirs=[folder]), cache=cache)
    sha = hashlib.sha256((folder / "known.safetensors").read_bytes()).hexdigest()
    civitai.known[sha] = _info(civitai)
    waits: list[float] = []
    civitai.limit_next, civitai.retry_after = 1, "1"
    got = lookup_civitai(library.loras, cache, civitai.url, sleep=waits.append)
    assert waits == [1.0] and got.stopped is None
    assert [r.status for r in got.results] == ["found", "not_found"]

    (folder / "known.civitai.info").unlink()
    civitai.limit_next, civitai.retry_after = 100, "0"
    got = lookup_civitai(library.loras, cache, civitai.url, retry_missing=True, max_wait=0.0, sleep=waits.append)
    assert [r.status for r in got.results] == ["failed", "not_asked"]
    assert "429" in got.stopped and "again" in got.stopped
    assert waits == [1.0, 0.0, 0.0] and civitai.limit_next == 100 - 3   # three tries, then it gives up
    assert not (folder / "known.civitai.info").exists()
    civitai.retry_after = "3600"   # longer than we ever wait: no wait at all
    got = lookup_civitai(library.loras, cache, civitai.url, retry_missing=True, sleep=waits.append)
    assert got.stopped and waits == [1.0, 0.0, 0.0]


def test_network_error_writes_nothing(loras, tmp_path, capsys):
    folder = _folder(tmp_path, loras)
    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = sorted(folder.iterdir())
    code, data, err = _cli(folder, tmp_path / "cache.json", "--civitai-lookup", "--civitai-url",
                           f"http://127.0.0.1:{port}", capsys=capsys)
    assert code == 1 and len(data["loras"]) == 2
    assert "could not reach" in err and "Check your connection" in err
    assert sorted(folder.iterdir()) == before


def test_preview_over_the_cap_or_of_another_type_is_skipped(civitai, loras, tmp_path, monkeypatch):
    import lora_studio.library.civitai as civ

    folder = _folder(tmp_path, loras)
    cache = ScanCache(None)
    library = scan_models(gather_folders(lora_dirs=[folder]), cache=cache)
    sha = hashlib.sha256((folder / "known.safetensors").read_bytes()).hexdigest()
    civitai.known[sha] = _info(civitai)
    monkeypatch.setattr(civ, "MAX_PREVIEW_BYTES", 16)
    got = lookup_civitai(library.loras, cache, civitai.url)
    assert "over the 16-byte cap" in next(r.message for r in got.results if r.name == "known")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("known")) == [
        "known.civitai.info", "known.safetensors"]
    (folder / "known.civitai.info").unlink()
    monkeypatch.setattr(civ, "MAX_PREVIEW_BYTES", 1 << 20)
    civitai.image_type = "image/jpeg"
    lookup_civitai(library.loras, cache, civitai.url)
    assert (folder / "known.preview.jpeg").read_bytes() == PNG
    (folder / "known.civitai.info").unlink()
    (folder / "known.preview.jpeg").unlink()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    civitai.known[sha]["images"] = [{"url": secret.as_uri(), "type": "image"}]
    got = lookup_civitai(library.loras, cache, civitai.url)
    assert "not http(s)" in next(r.message for r in got.results if r.name == "known")
    assert not [p for p in folder.iterdir() if ".preview" in p.name]


def test_a_bad_url_is_a_user_error(loras, tmp_path, capsys):
    folder = _folder(tmp_path, loras)
    assert main(["library", "--lora-dir", str(folder), "--civitai-lookup", "--civitai-url", "ftp://x"]) != 0
    assert "http(s)" in capsys.readouterr().err
