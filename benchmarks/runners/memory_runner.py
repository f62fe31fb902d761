"""whisper_mlx on one audio *file* (decoded by whisper_mlx itself, in pieces), for the memory test.

Prints one ``@@BENCH_RESULT@@ {json}`` line: peak RSS after loading the model and after the
transcription (``ru_maxrss``), the wall time and the transcript's size.
"""

import argparse
import time

from common import emit, peak_rss_bytes, versions

parser = argparse.ArgumentParser(description="Peak RSS of whisper_mlx.transcribe on one file.")
parser.add_argument("--model", required=True, help="model directory")
parser.add_argument("--audio", required=True, help="audio file (not .npy: decoding is part of the test)")
parser.add_argument("--batch-size", type=int, default=12)
parser.add_argument("--language", default="en")
args = parser.parse_args()

import whisper_mlx  # noqa: E402  (before mlx.core: it preloads the BLAS)

model = whisper_mlx.load_model(args.model, dtype=None)
rss_after_load = peak_rss_bytes()
start = time.perf_counter()
result = whisper_mlx.transcribe(args.audio, model=model, batch_size=args.batch_size, language=args.language)
seconds = time.perf_counter() - start
emit({"peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_load_bytes": rss_after_load, "seconds": seconds,
      "text_chars": len(result["text"]), "segments": len(result["segments"]),
      "versions": versions("whisper-mlx", "mlx", "numpy")})  # fmt: skip
