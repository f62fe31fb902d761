"""Load the model, build the engine and the app, and run uvicorn until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import uvicorn

from ..errors import WhisperMLXError
from ..load_models import load_model
from ..many import BatchEngine
from .app import create_app

PROG = "whisper_mlx serve"


DEFAULT_MODEL_NAME = "tiny.en"  # what default_model_path() holds


def served_name(model_arg: str | None) -> str:
    """The model's id in /v1/models: a local model's directory name, a Hub name as given, or the default's."""
    if model_arg is None:
        return DEFAULT_MODEL_NAME
    path = Path(model_arg)
    return path.resolve().name if path.exists() else model_arg


def serve(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model, backend=args.backend)
    except (WhisperMLXError, OSError, ValueError, ImportError) as exc:
        print(f"{PROG}: error: cannot load the model: {exc}", file=sys.stderr)
        return 1
    with BatchEngine(model, batch_size=args.batch_size) as engine:
        app = create_app(
            model,
            engine=engine,
            model_name=served_name(args.model),
            api_key=args.api_key,
            max_upload_mb=args.max_upload_mb,
            max_queue=args.max_queue,
        )
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
