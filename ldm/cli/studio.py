"""``ldm studio``: a local web page for any model (``ldm.studio``; the ``[studio]`` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .common import add_model, model_path


def cmd_studio(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("gradio") is None:  # said before a model loads
        raise ValueError('the studio needs Gradio: pip install -e ".[studio]" (or pip install gradio)')
    from ..studio import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ldm studio: warning: --host {args.host} serves the studio to every machine that can reach this one, "
              "and the page has no authentication", file=sys.stderr)
    serve(model_path(args), host=args.host, port=args.port, device=args.device)


def add_studio_command(sub) -> None:
    p = sub.add_parser("studio", help="steer the reverse process of any model in a local web page (needs [studio])")
    add_model(p, "run directory, diffusers DDPM folder, or Stable Diffusion file or folder")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only; 0.0.0.0: every "
                   "network it is on (the page has no authentication)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.set_defaults(func=cmd_studio)
