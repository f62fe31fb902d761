"""Writes whisper_mlx/assets/silero_vad_16k.npz, the Silero VAD weights that whisper_mlx/silero.py runs in
numpy, from the ONNX export in the silero-vad wheel (MIT, Silero Team).

    pip download --no-deps -d /tmp/dl silero-vad==6.2.3 && unzip -o -q /tmp/dl/silero_vad-6.2.3-*.whl -d /tmp/dl
    pip install onnx                # only for this script
    python benchmarks/tools/silero_vad_weights.py /tmp/dl/silero_vad/data/silero_vad_16k_op15.onnx

silero_vad_16k_op15.onnx is the 16 kHz-only export of the model in silero_vad.onnx (same outputs); its
weights are plain initializers. Run time needs neither onnx nor onnxruntime.

With `--reference WAVEFORM.npy OUT.npy` (and onnxruntime installed) it also writes the probabilities that
onnxruntime gives chunk by chunk, as silero-vad's own wrapper runs the model, for tests/test_vad.py:
tests/data/jfk_silero_vad.npy is that of whisper_mlx.load_audio("tests/data/jfk.flac").
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "whisper_mlx" / "assets" / "silero_vad_16k.npz"
NAMES = {
    "stft": "model.stft.forward_basis_buffer",
    **{f"conv{i}.weight": f"model.encoder.{i}.reparam_conv.weight" for i in range(4)},
    **{f"conv{i}.bias": f"model.encoder.{i}.reparam_conv.bias" for i in range(4)},
    **{f"lstm.{part}": f"model.decoder.rnn.{part}" for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "out.weight": "model.decoder.decoder.2.weight",
    "out.bias": "model.decoder.decoder.2.bias",
}


def main(source: str) -> None:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(source).graph
    found = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = {key: np.ascontiguousarray(found[name], np.float32) for key, name in NAMES.items()}
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    np.savez_compressed(OUT, **weights, source=np.array(f"{Path(source).name} sha256 {digest}"))
    print(f"wrote {OUT} from {source} (sha256 {digest})")


def reference(source: str, waveform: str, out: str) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    audio = np.load(waveform).astype(np.float32)
    audio = np.pad(audio, (0, -len(audio) % 512))
    state, context, probabilities = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32), []
    for start in range(0, len(audio), 512):
        window = np.concatenate([context, audio[None, start : start + 512]], axis=1)
        feeds = {"input": window, "state": state, "sr": np.array(16000, np.int64)}
        probability, state = session.run(None, feeds)
        context = window[:, -64:]
        probabilities.append(probability[0, 0])
    np.save(out, np.array(probabilities, np.float32))
    print(f"wrote {out}: {len(probabilities)} probabilities")


if __name__ == "__main__":
    main(sys.argv[1])
    if "--reference" in sys.argv:
        at = sys.argv.index("--reference")
        reference(sys.argv[1], sys.argv[at + 1], sys.argv[at + 2])
