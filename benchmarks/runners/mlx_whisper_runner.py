"""mlx-whisper 0.4.3 on one file (runs inside benchmarks/.venvs/mlx_whisper)."""

from common import measure, parse_args, preload_blas, versions

args = parse_args()
blas = preload_blas(args.blas)  # before mlx.core
import mlx.core as mx  # noqa: E402
import mlx_whisper  # noqa: E402
from mlx_whisper.transcribe import ModelHolder  # noqa: E402

FP16 = args.dtype == "float16"


def load():
    return ModelHolder.get_model(args.model, mx.float16 if FP16 else mx.float32)


def transcribe(model, samples):
    result = mlx_whisper.transcribe(samples, path_or_hf_repo=args.model, language=args.language, fp16=FP16)
    return result["text"]


measure(load, transcribe, args, {"blas": blas, "device": str(mx.default_device()), "dtype": args.dtype,
                                 "versions": versions("mlx-whisper", "mlx", "numpy")})  # fmt: skip
