"""lightning-whisper-mlx 0.0.10 on one file (runs inside benchmarks/.venvs/lightning).

Calls ``transcribe_audio`` with a local model path: the ``LightningWhisperMLX`` class only
downloads from the Hugging Face hub and then calls the same function.
"""

from common import measure, parse_args, preload_blas, versions

args = parse_args()
blas = preload_blas(args.blas)  # before mlx.core
import mlx.core as mx  # noqa: E402
from lightning_whisper_mlx.transcribe import ModelHolder, transcribe_audio  # noqa: E402

FP16 = args.dtype == "float16"


def load():
    return ModelHolder.get_model(args.model, mx.float16 if FP16 else mx.float32)


def transcribe(model, samples):
    result = transcribe_audio(samples, path_or_hf_repo=args.model, language=args.language,
                              batch_size=args.batch_size, fp16=FP16)  # fmt: skip
    return result["text"]


measure(load, transcribe, args, {"blas": blas, "device": str(mx.default_device()), "dtype": args.dtype,
                                 "batch_size": args.batch_size,
                                 "versions": versions("lightning-whisper-mlx", "mlx", "tiktoken",
                                                      "numpy")})  # fmt: skip
