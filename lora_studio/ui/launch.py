"""Parse the app's command line and launch the Gradio server (localhost unless --listen)."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description="LoRA Studio: train, mix and export LoRAs.")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--listen", action="store_true", help="bind to 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--auth", default=None, help="user:pass required when --listen or --share is used")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    return p.parse_args(argv)


def launch_from_args(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .app import build_app

    auth = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = (user, password)
    elif args.listen or args.share:
        print("WARNING: --listen/--share without --auth exposes LoRA Studio (and your files) to the network. "
              "Add --auth user:pass.", file=sys.stderr)
    app = build_app()
    app.queue().launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        share=args.share,
        auth=auth,
        inbrowser=not args.no_browser,
    )
    return 0
