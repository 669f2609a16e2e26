"""AUTOMATIC1111's LoRA prompt syntax: ``<lora:name:0.7>`` picks a LoRA from the LoRA folder at a strength.

Accepted forms (``lyco`` works like ``lora``, as the LyCORIS extension spells it)::

    <lora:name>              strength 1 for the UNet and the text encoder
    <lora:name:0.7>          0.7 for both
    <lora:name:0.7:0.3>      A1111's order: text encoder 0.7, UNet 0.3
    <lora:name:te=0.7:unet=0.3>   the same, named

Parsing is pure (no file system); ``resolve_requests`` then finds the files in a folder.
The tag grammar is A1111's (``<kind:arg:arg...>``, ``key=value`` arguments); written by hand because no
installed library parses it. Tag options of A1111 extensions that LoRA Studio does not apply (``lbw=``, ``dyn=``,
``start=``, ``stop=``) are skipped with a warning.

``parse_prompt_attention`` reads A1111's emphasis syntax (``(x)``, ``[x]``, ``(x:1.3)``, ``\\(``, ``BREAK``) into
``[text, weight]`` pairs; ``lora_studio.prompt_weights`` turns them into text-encoder embeddings.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .library import resolve

TAG_RE = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
NAMED_KEYS = ("te", "unet")
# options of A1111 extensions (block weights, dynamic rank, step ranges) that are read and not applied
IGNORED_KEYS = ("lbw", "dyn", "start", "stop")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA asked for in a prompt. ``strength`` is the UNet strength; ``te_strength`` is None when the
    text encoder takes the same strength (the mixer's convention)."""

    name: str
    strength: float = 1.0
    te_strength: float | None = None
    tag: str = ""

    @property
    def effective_te(self) -> float:
        return self.strength if self.te_strength is None else self.te_strength


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str                      # the text with the tags removed (what the text encoder sees)
    loras: tuple[LoraRequest, ...]


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{tag}: {text!r} is not a number. Write strengths like <lora:name:0.7>.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{tag}: strength {text!r} is not finite. Use a number such as 0.7 or -0.5.")
    return value


def _parse_tag(body: str, tag: str) -> LoraRequest:
    parts = [p.strip() for p in body.split(":")]
    name, args = parts[0], parts[1:]
    if not name:
        raise ConfigError(f"{tag} has no LoRA name. Write <lora:NAME:STRENGTH>.")
    positional: list[float] = []
    named: dict[str, float] = {}
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            key = key.strip().lower()
            if key in IGNORED_KEYS:
                log.warning("%s: LoRA Studio does not apply %r; the setting is ignored.", tag, arg)
                continue
            if key not in NAMED_KEYS:
                raise ConfigError(f"{tag}: unknown setting {key!r}. Known settings: {', '.join(NAMED_KEYS)} "
                                  "(e.g. <lora:name:te=0.5:unet=1>).")
            named[key] = _number(value.strip(), tag)
        elif named:
            raise ConfigError(f"{tag}: a plain number cannot follow a named setting. Put numbers first.")
        else:
            positional.append(_number(arg, tag))
    if len(positional) > 2:
        raise ConfigError(f"{tag} has {len(positional)} numbers; at most two are read (text encoder, UNet). "
                          "Remove the rest.")
    # A1111: the first number is the text-encoder multiplier, the second the UNet one (default: the first).
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return LoraRequest(name, unet, None if te == unet else te, tag)


def _clean(text: str) -> str:
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip().strip(",").strip()


def parse_prompt(text: str) -> ParsedPrompt:
    """Split ``text`` into the plain prompt and the LoRA requests, in the order they appear.
    A name asked for twice is an error (A1111 would apply it twice, which is rarely meant)."""
    requests: list[LoraRequest] = []
    for m in TAG_RE.finditer(text):
        req = _parse_tag(m.group(2), m.group(0))
        if any(r.name == req.name for r in requests):
            first = next(r.tag for r in requests if r.name == req.name)
            raise ConfigError(f"the prompt asks for LoRA {req.name!r} twice ({first} and {req.tag}). Keep one tag.")
        requests.append(req)
    return ParsedPrompt(_clean(TAG_RE.sub("", text)), tuple(requests))


def strip_lora_tags(text: str) -> str:
    """The prompt without its ``<lora:...>`` tags (what the text encoder should see)."""
    return _clean(TAG_RE.sub("", text)) if TAG_RE.search(text) else text


def resolve_requests(requests: tuple[LoraRequest, ...] | list[LoraRequest],
                     folder: str | Path | None) -> list[tuple[LoraRequest, Path]]:
    """Find each requested LoRA's file in ``folder``; an unknown name raises ``InputFileError`` that lists
    what the folder holds."""

    if requests and folder is None:
        names = ", ".join(r.tag or r.name for r in requests)
        raise ConfigError(f"the prompt asks for {names}, but no LoRA folder was given. "
                          "Pass --lora-dir (or pick the folder in the app).")
    return [(r, resolve(r.name, folder)) for r in requests]


def add_prompt_loras(mixer, text: str, folder: str | Path | None, allow_partial: bool = False) -> ParsedPrompt:
    """Put the prompt's LoRAs into ``mixer`` (for an app that re-renders as the user edits the prompt): a file
    already in the mix gets the tag's strengths (no second read); a new one is read and added. Returns the
    parsed prompt; call ``mixer.apply()`` next."""
    parsed = parse_prompt(text)
    for req, path in resolve_requests(parsed.loras, folder):
        known = [e for e in mixer.entries if e.path is not None and Path(e.path).resolve() == path.resolve()]
        if known:
            mixer.set_strength(known[0].name, unet=req.strength, te=req.effective_te)
        else:
            mixer.add(str(path), strength=req.strength, te_strength=req.te_strength, allow_partial=allow_partial)
    return parsed


# --------------------------------------------------------------------------- emphasis: (x), [x], (x:1.3), BREAK
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
_ESCAPABLE = "()[]\\"
_EXPLICIT_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_PLAIN_RUN = re.compile(r"[^\\()\[\]:]+")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _add_text(pieces: list[list], text: str) -> None:
    """Plain text; each ``BREAK`` (uppercase, a word of its own) becomes ``["BREAK", -1]``."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append(["BREAK", -1])
        pieces.append([part, 1.0])


def parse_prompt_attention(text: str) -> list[list]:
    """A1111's emphasis: ``[[text, weight], ...]``, with the same pieces and weights as AUTOMATIC1111's function
    of this name. ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.5)`` multiplies by 1.5; brackets
    left open are closed at the end; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (a lone
    backslash is dropped); a ``)`` or ``]`` with nothing open is text; ``BREAK`` gives ``["BREAK", -1]``;
    neighbours of equal weight are joined; an empty prompt gives ``[["", 1.0]]``.

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    pieces: list[list] = []
    open_round: list[int] = []    # where in ``pieces`` each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            escaped = text[pos + 1:pos + 2]
            if escaped and escaped in _ESCAPABLE:
                pieces.append([escaped, 1.0])
                pos += 2
            else:
                pieces.append(["", 1.0])
                pos += 1
        elif char == "(":
            open_round.append(len(pieces))
            pos += 1
        elif char == "[":
            open_square.append(len(pieces))
            pos += 1
        elif char == ":":
            weight = _EXPLICIT_WEIGHT.match(text, pos)
            if weight and open_round:
                try:
                    factor = float(weight.group(1))
                except ValueError:
                    raise ConfigError(f"{weight.group(0)!r} in the prompt is not a weight. Write weights like "
                                      "(word:1.3), or escape the bracket as \\( \\).") from None
                scale(open_round.pop(), factor)
                pos = weight.end()
            elif weight:
                _add_text(pieces, weight.group(0))
                pos = weight.end()
            else:
                _add_text(pieces, ":")
                pos += 1
        elif char == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
            pos += 1
        elif char == "]" and open_square:
            scale(open_square.pop(), SQUARE_FACTOR)
            pos += 1
        elif char in ")]":
            _add_text(pieces, char)
            pos += 1
        else:
            run = _PLAIN_RUN.match(text, pos)
            _add_text(pieces, run.group(0))
            pos = run.end()
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, SQUARE_FACTOR)
    if not pieces:
        return [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged
