"""MLX memory of the decoding loop: the peak of a large-v3-turbo shaped model (random weights) decoding
a batch of windows, and MLX's buffer-cache policy between batches on a long batched transcription.

    python -m benchmarks.mlx_memory turbo --batch 12 --steps 40
    python -m benchmarks.mlx_memory cache --audio tests/data/alice_ch1.flac
"""

from __future__ import annotations

import argparse
import json
import time

import whisper_mlx

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from whisper_mlx.backends import mlx_backend
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.decoding import DecodingOptions, DecodingTask
from whisper_mlx.dims import ModelDimensions
from whisper_mlx.whisper import Whisper

MIB = 2**20
TURBO = ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 4)  # large-v3-turbo


def turbo_decode_peak(batch: int, steps: int, dtype_name: str) -> dict:
    """Peak MLX memory while a turbo-shaped decoder (random weights) decodes `batch` windows of random
    audio features: the decoder weights, cross-attention keys/values, self-attention caches, logits.
    The encoder's weights are never materialised (random features stand in for its output)."""
    dtype = getattr(mx, dtype_name)
    model = Whisper(TURBO, dtype)
    decoder_weights = [
        (k, (mx.random.normal(v.shape) * 0.02).astype(dtype)) for k, v in tree_flatten(model.decoder.parameters())
    ]
    model.decoder.load_weights(decoder_weights)
    mx.eval(model.decoder.parameters())
    features = mx.random.normal((batch, TURBO.n_audio_ctx, TURBO.n_audio_state)).astype(dtype)
    mx.eval(features)
    weights = sum(v.nbytes for _, v in decoder_weights)
    mx.reset_peak_memory()
    start = time.perf_counter()
    task = DecodingTask(model, DecodingOptions(language="en", sample_len=steps), MLXBackend(model))
    results = task.run(features)
    return {
        "shape": "large-v3-turbo (decoder; random weights)",
        "batch": batch,
        "dtype": dtype_name,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
        "decoder_weights_mib": round(weights / MIB),
        "features_mib": round(features.nbytes / MIB),
        "peak_mib": round(mx.get_peak_memory() / MIB),
        "cache_mib_after": round(mx.get_cache_memory() / MIB),
        "tokens": sum(len(r.tokens) for r in results),
        "device": str(mx.default_device()),
    }


POLICIES = {
    "clear_every_batch": lambda self: mx.clear_cache(),
    "bounded": MLXBackend.free_cached_buffers,
    "never": lambda self: None,
}


def cache_policy_run(audio: str, policy: str, batch_size: int) -> dict:
    """A batched MLX-backend transcription under one buffer-cache policy: time, peak, cache at the end."""
    from whisper_mlx.load_models import load_model, packaged_model_path

    mlx_backend.MLXBackend.free_cached_buffers = POLICIES[policy]  # type: ignore[method-assign]
    model = load_model(packaged_model_path("tiny.en"), backend="mlx")
    mx.reset_peak_memory()
    start = time.perf_counter()
    result = whisper_mlx.transcribe(audio, model=model, batch_size=batch_size, language="en")
    return {
        "policy": policy,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_mib": round(mx.get_peak_memory() / MIB),
        "cache_mib_after": round(mx.get_cache_memory() / MIB),
        "text_chars": len(result["text"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["turbo", "cache"])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--audio", default="tests/data/alice_ch1.flac")
    parser.add_argument("--policy", choices=list(POLICIES), default="bounded")
    args = parser.parse_args(argv)
    if args.what == "turbo":
        report = turbo_decode_peak(args.batch, args.steps, args.dtype)
    else:
        report = cache_policy_run(args.audio, args.policy, args.batch)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
