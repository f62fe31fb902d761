"""whisper_mlx (this project) on one file, in the current interpreter with the project importable.

whisper_mlx preloads its optimized BLAS itself; ``--blas`` is ignored here (see backend_info()).
"""

from common import measure, parse_args, versions

args = parse_args()
import whisper_mlx  # noqa: E402  (before mlx.core: it preloads the BLAS)


def load():
    return whisper_mlx.load_model(args.model, dtype=None)


# beams: openai's CLI defaults (beam_size=5, best_of=5), as faster-whisper's
BEAMS = {"beam_size": args.beam_size, "best_of": 5} if args.beam_size > 1 else {}


def transcribe(model, samples):
    result = whisper_mlx.transcribe(samples, model=model, batch_size=args.batch_size, language=args.language, **BEAMS)
    return result["text"]


info = whisper_mlx.backend_info()
measure(load, transcribe, args, {"blas": info.get("blas_path") or info.get("blas"), "device": info.get("device"),
                                 "dtype": info.get("default_dtype"), "batch_size": args.batch_size,
                                 "beam_size": args.beam_size,
                                 "backend_info": info,
                                 "versions": versions("whisper-mlx", "mlx", "numpy")})  # fmt: skip
