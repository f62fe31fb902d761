"""`whisper_mlx serve`: an OpenAI-compatible transcription server (the `server` extra: FastAPI, uvicorn,
python-multipart). This module imports none of them until the server starts, so that `whisper_mlx serve`
without the extra says what to install instead of failing on an import."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..cli import positive_int

PROG = "whisper_mlx serve"
EXTRA_MODULES = ("fastapi", "uvicorn", "multipart")


def missing_extra() -> str | None:
    """The first module of the server extra that cannot be imported, or None."""
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def create_app(*args, **kwargs):
    """whisper_mlx.server.app.create_app, imported on use (it needs FastAPI)."""
    from .app import create_app as app_factory

    return app_factory(*args, **kwargs)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="OpenAI-compatible transcription server.")
    parser.add_argument("--model", default=None, help="model path, Hub repo or short name (default: tiny.en)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=12, help="windows decoded together (default: %(default)s)"
    )
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    parser.add_argument(
        "--max-upload-mb", type=positive_float, default=25, help="largest audio upload, in MiB (default: %(default)s)"
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests queued or decoding at once; more get 503 (default: %(default)s)",
    )
    parser.add_argument("--backend", default=None, choices=("auto", "mlx", "numpy"), help="model backend")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; 1 when the extra is missing or the model cannot load, 2 for usage errors."""
    missing = missing_extra()
    if missing is not None:
        print(
            f"{PROG}: needs the server extra ({missing} is missing): pip install 'whisper_mlx[server]'", file=sys.stderr
        )
        return 1
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2
    from .run import serve

    return serve(args)
