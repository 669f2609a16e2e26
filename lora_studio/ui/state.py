"""What every tab shares: the app context (outputs folder, path policy, job registry) and two adapters:
core errors -> ``gr.Error`` messages, core progress events -> ``gr.Progress``.

Per-session values (the mix pipeline, the job a page watches) live in ``gr.State`` components made in
``app.build_app``; the only process-wide table is ``jobs.REGISTRY``, keyed by job id.
"""

from __future__ import annotations

import functools
import html
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gradio as gr

from ..errors import LoraStudioError
from ..jobs import JobRegistry
from ..progress import ProgressCallback, ProgressEvent
from .paths import PathPolicy


@dataclass
class AppContext:
    policy: PathPolicy
    registry: JobRegistry

    @property
    def outputs(self) -> Path:
        return self.policy.outputs


def user_errors(fn: Callable) -> Callable:
    """Run ``fn``; a ``LoraStudioError`` becomes a ``gr.Error`` with its message (the user can fix it), any other
    exception a short "internal error" message with the traceback on the console, never on the page."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except LoraStudioError as err:
            raise gr.Error(_text(str(err)), print_exception=False) from None
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(_text(f"internal error {type(err).__name__}: {err}. This is a bug in LoRA Studio; the "
                           "details are in the console that runs the app."), print_exception=False) from None

    return wrapper


def _text(message: str) -> str:
    """gr.Error renders HTML: keep ``<lora:x:1>`` and friends visible as text."""
    return html.escape(message, quote=False)


def progress_adapter(progress: gr.Progress | None) -> ProgressCallback | None:
    """A core ``ProgressCallback`` that moves a ``gr.Progress`` bar."""
    if progress is None:
        return None

    def forward(ev: ProgressEvent) -> None:
        desc = f"{ev.stage} {ev.current}/{ev.total}" if ev.total else ev.stage
        if ev.message:
            desc += f": {ev.message[:80]}"
        progress(ev.fraction, desc=desc)

    return forward


def wire(event: Callable, fn: Callable, fields: Mapping[str, Any], outputs: Any, *, api_name: str,
         progress: bool = False) -> Any:
    """Connect ``event`` (``button.click``) to ``fn(values)`` / ``fn(values, progress)``, where ``values`` is
    ``{name: value}`` for the ``fields`` mapping of names to input components. The names are the API's parameter
    names (``strength_2``, not ``param_12``); the one mapping gives both the inputs and their names, so no
    handler depends on the order of widgets."""
    names = tuple(fields)
    return event(_named_handler(fn, names, progress), [fields[n] for n in names], outputs, api_name=api_name)


def _named_handler(fn: Callable, names: Sequence[str], progress: bool = False) -> Callable:
    """A gradio handler whose parameters are ``names``. gradio passes input values positionally, in the order
    of the ``inputs`` list, and reads the API's parameter names from the handler's signature: ``wire`` builds
    both from one mapping. With ``progress`` a ``gr.Progress`` is asked for and handed over."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))

    def handler(*args: Any):
        values = dict(zip(names, args))
        if progress:
            return fn(values, args[len(names)] if len(args) > len(names) else None)
        return fn(values)

    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return user_errors(handler)
