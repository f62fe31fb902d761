"""faster-whisper (CTranslate2) on one file: greedy (beam_size=1) like the MLX systems, or with
``--beam-size 5`` its own default decoding (5 beams, best_of 5).

``--batch-size`` > 1 uses ``BatchedInferencePipeline`` (which segments with its bundled Silero VAD).
"""

from common import measure, parse_args, versions

args = parse_args()
from faster_whisper import BatchedInferencePipeline, WhisperModel  # noqa: E402


def load():
    model = WhisperModel(args.model, device="cpu", compute_type=args.dtype)
    return BatchedInferencePipeline(model) if args.batch_size > 1 else model


def transcribe(model, samples):
    options = {"language": args.language, "beam_size": args.beam_size}
    if args.batch_size > 1:
        options["batch_size"] = args.batch_size
    segments, _ = model.transcribe(samples, **options)
    return "".join(segment.text for segment in segments)


measure(load, transcribe, args, {"blas": "n/a (CTranslate2)", "device": "cpu", "dtype": args.dtype,
                                 "batch_size": args.batch_size, "beam_size": args.beam_size,
                                 "versions": versions("faster-whisper", "ctranslate2", "numpy")})  # fmt: skip
