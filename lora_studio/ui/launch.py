"""Parse the app's command line and launch the Gradio server (127.0.0.1 and the first free port from 7860
unless told otherwise; --listen/--share without --auth are refused)."""

from __future__ import annotations

import argparse
import socket
import sys

from ..cpu_memory import APP_TRIM_THRESHOLD, tune_glibc_malloc
from . import app as ui_app

DEFAULT_PORT = 7860


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description="LoRA Studio: train, mix and export LoRAs.")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--listen", action="store_true", help="bind to 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--auth", default=None, help="user:pass; required with --listen or --share")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--outputs", default="outputs", help="folder for runs, grids and exports (default: outputs)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                   help="a folder the app may read (datasets, LoRAs, models); repeat for several. "
                        "outputs/ is always allowed; nothing else is.")
    return p.parse_args(argv)


def free_port(host: str = "127.0.0.1", start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``start`` that nothing listens on."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}..{start + tries - 1}; pass --port.")


def exposure_refusal(args: argparse.Namespace) -> str | None:
    """Why the app must not start as asked, or None. Anyone who reaches a password-less app on the network can
    read the files it may open and run training on the machine, so --listen/--share need --auth."""
    if (args.listen or args.share) and not args.auth:
        flag = "--listen" if args.listen else "--share"
        return (f"{flag} would serve LoRA Studio (and the files it may read) to the network with no password, so it "
                f"was not started. Add a user name and password: python app.py {flag} --auth user:pass")
    return None


def launch_from_args(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            print("--auth must look like user:pass.", file=sys.stderr)
            return 2
        auth = (user, password)
    refusal = exposure_refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    ctx = ui_app.make_context(args.outputs, args.allow_dir)
    app = ui_app.build_app(ctx)
    app.queue().launch(
        server_name=host,
        server_port=args.port or free_port(host),
        share=args.share,
        auth=auth,
        inbrowser=not args.no_browser,
        allowed_paths=[str(p) for p in ctx.policy.roots],
    )
    return 0


def entry() -> None:
    """The app's process entry point (``python app.py``, the ``lora-studio-app`` command)."""
    tune_glibc_malloc(trim_threshold=APP_TRIM_THRESHOLD)
    raise SystemExit(launch_from_args())
