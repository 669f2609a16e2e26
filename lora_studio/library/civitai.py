"""Civitai by hash, only when the user asks: for each LoRA without a ``name.civitai.info``, ask Civitai's public
``/api/v1/model-versions/by-hash/{sha256}`` and write what it answers as ``name.civitai.info`` (Civitai-Helper's
format: the same JSON) and its first image as ``name.preview.png`` / ``.jpeg`` / ``.webp`` beside the file.

A hash Civitai does not know (404) is remembered in the scan cache and not asked again unless ``retry_missing``.
A rate limit (429) is waited out per ``Retry-After`` within a bounded total wait, then the rest is left for a
later run. A network error or timeout stops the lookup with a message; nothing is written for that LoRA.
Standard library only (``urllib``)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import ConfigError, LoraStudioError
from ..fileio import atomic_path, write_text_atomic
from ..progress import ProgressCallback, report
from .cache import ScanCache
from .scan import LoraEntry
from .sidecars import MAX_SIDECAR_BYTES

DEFAULT_URL = "https://civitai.com"
USER_AGENT = f"LoRA-Studio/{__version__} (model library; Civitai lookup by hash)"
TIMEOUT_S = 20.0
MAX_PREVIEW_BYTES = 16 * 1024 * 1024
MAX_TOTAL_WAIT_S = 60.0          # all Retry-After waits of one lookup together
MAX_RETRY_AFTER_S = 30.0         # one wait; Civitai asking for longer means "come back later"
MAX_TRIES = 3                    # of one request under a rate limit
PREVIEW_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/jpg": ".jpeg", "image/webp": ".webp"}
CACHE_FIELD = "civitai_lookup"   # in the scan cache's data of a file: "not_found" when Civitai answered 404
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CivitaiUnavailable(LoraStudioError):
    """Civitai could not be reached, timed out, or answered something that is not its API."""


class RateLimited(LoraStudioError):
    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class LookupResult:
    name: str
    status: str                  # "found", "not_found", "known_missing", "failed", "not_asked"
    message: str
    written: list[Path] = field(default_factory=list)


@dataclass
class LookupReport:
    results: list[LookupResult] = field(default_factory=list)
    stopped: str | None = None   # why the lookup ended early (rate limit, network), None when it finished

    @property
    def written(self) -> list[Path]:
        return [p for r in self.results for p in r.written]


def check_base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--civitai-url {url!r} is not an http(s) address; give one like {DEFAULT_URL}.")
    return url.rstrip("/")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: treated as "longer than we wait"
        return None


def _get(url: str, limit: int, timeout: float) -> tuple[bytes, str]:
    """(body, content type) of a GET; at most ``limit`` bytes are read (more is an error). A 404 raises
    ``FileNotFoundError``; 429 ``RateLimited``; anything else that fails ``CivitaiUnavailable``."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json, image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise CivitaiUnavailable(f"{url} answered {int(length)} bytes, over the {limit}-byte cap")
            body = resp.read(limit + 1)
            if len(body) > limit:
                raise CivitaiUnavailable(f"{url} answered more than the {limit}-byte cap")
            return body, (resp.headers.get_content_type() or "").lower()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise FileNotFoundError(url) from None
        if err.code == 429:
            raise RateLimited(f"Civitai is limiting requests (429 at {url})",
                              _retry_after(err.headers.get("Retry-After"))) from None
        raise CivitaiUnavailable(f"{url} answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise CivitaiUnavailable(f"could not reach {url} ({reason})") from None


class _Client:
    """GETs with the rate-limit waits of one lookup (bounded in total, and in tries per request)."""

    def __init__(self, timeout: float, max_wait: float, sleep: Callable[[float], None]):
        self.timeout, self.wait_left, self.sleep = timeout, max_wait, sleep

    def get(self, url: str, limit: int) -> tuple[bytes, str]:
        for tries in range(1, MAX_TRIES + 1):
            try:
                return _get(url, limit, self.timeout)
            except RateLimited as err:
                wait = err.retry_after if err.retry_after is not None else MAX_RETRY_AFTER_S + 1
                if tries == MAX_TRIES or wait > min(MAX_RETRY_AFTER_S, self.wait_left):
                    raise
                self.wait_left -= wait
                self.sleep(wait)


def _first_image(info: dict[str, Any]) -> str | None:
    for image in info.get("images") or []:
        if isinstance(image, dict) and isinstance(image.get("url"), str) and image.get("type", "image") == "image":
            return image["url"]
    return None


def _lookup_one(client: _Client, base: str, entry: LoraEntry, stem: str) -> LookupResult:
    body, _ = client.get(f"{base}/api/v1/model-versions/by-hash/{entry.sha256}", MAX_SIDECAR_BYTES)
    try:
        info = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise CivitaiUnavailable(f"{base} answered something that is not Civitai's JSON for {entry.name}")
    result = LookupResult(entry.name, "found", "")
    note = ""
    url = _first_image(info)
    url = urllib.parse.urljoin(base + "/", url) if url else None
    if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):  # never file:// or the like
        note, url = f"; no preview (its address {url[:80]!r} is not http(s))", None
    if entry.preview is None and url:
        try:
            image, ctype = client.get(url, MAX_PREVIEW_BYTES)
        except (CivitaiUnavailable, FileNotFoundError) as err:
            note = f"; no preview ({err})"
        else:
            suffix = PREVIEW_SUFFIXES.get(ctype)
            if suffix is None:
                note = f"; no preview (its image is {ctype or 'of no stated type'}, not PNG, JPEG or WebP)"
            else:
                preview = entry.path.with_name(f"{stem}.preview{suffix}")
                with atomic_path(preview) as tmp:
                    tmp.write_bytes(image)
                result.written.append(preview)
    info_path = entry.path.with_name(f"{stem}.civitai.info")
    write_text_atomic(info_path, json.dumps(info, indent=2, ensure_ascii=False))
    result.written.insert(0, info_path)
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    result.message = f"{entry.name}: {model.get('name')} / {info.get('name')} ({info.get('baseModel')}){note}"
    return result


def lookup_civitai(loras: list[LoraEntry], cache: ScanCache, base_url: str = DEFAULT_URL,
                   retry_missing: bool = False, timeout: float = TIMEOUT_S, max_wait: float = MAX_TOTAL_WAIT_S,
                   sleep: Callable[[float], None] = time.sleep,
                   progress: ProgressCallback | None = None) -> LookupReport:
    """Ask Civitai about every usable LoRA in ``loras`` that has no ``.civitai.info`` beside it (hashes known
    to be missing from Civitai are skipped unless ``retry_missing``). ``cache`` is the scan cache the entries
    came from; it records the 404s (call ``cache.save()`` after)."""
    base = check_base_url(base_url)
    client = _Client(timeout, max_wait, sleep)
    out = LookupReport()
    todo = []
    for e in loras:
        stem = e.path.name[: -len(e.path.suffix)]
        if e.problem or not e.sha256 or not SHA256.match(e.sha256) or e.path.with_name(f"{stem}.civitai.info").exists():
            continue
        if not retry_missing and (cache.data_of(e.path) or {}).get(CACHE_FIELD) == "not_found":
            out.results.append(LookupResult(e.name, "known_missing", f"{e.name}: not on Civitai (asked before; "
                                            "--civitai-retry asks again)"))
            continue
        todo.append((e, stem))
    for i, (e, stem) in enumerate(todo):
        if out.stopped:
            out.results.append(LookupResult(e.name, "not_asked", f"{e.name}: not asked"))
            continue
        try:
            out.results.append(_lookup_one(client, base, e, stem))
        except FileNotFoundError:
            cache.note(e.path, CACHE_FIELD, "not_found")
            out.results.append(LookupResult(e.name, "not_found", f"{e.name}: not on Civitai (no model version "
                                            f"has SHA-256 {e.sha256[:10]}...); nothing written"))
        except RateLimited as err:
            out.results.append(LookupResult(e.name, "failed", f"{e.name}: {err}; nothing written"))
            out.stopped = (f"{err}, beyond what we wait; the LoRAs not asked are left for a later run "
                           "(run the same command again in a while).")
        except CivitaiUnavailable as err:
            out.results.append(LookupResult(e.name, "failed", f"{e.name}: {err}; nothing written"))
            out.stopped = (f"{err}. Check your connection (or --civitai-url) and run again; the LoRAs not "
                           "asked are left as they are.")
        report(progress, "civitai", i + 1, len(todo), e.name)
    return out
