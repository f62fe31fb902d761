"""Silero VAD in numpy against onnxruntime's output on the same model."""

import numpy as np

import whisper_mlx
from whisper_mlx.silero import CHUNK, SileroStream, speech_probabilities


def test_silero_in_numpy_matches_onnxruntime(data_dir):
    """tests/data/jfk_silero_vad.npy: onnxruntime on silero-vad 6.2.3's ONNX model, chunk by chunk
    (benchmarks/tools/silero_vad_weights.py --reference)."""
    audio = whisper_mlx.load_audio(str(data_dir / "jfk.flac"))
    expected = np.load(data_dir / "jfk_silero_vad.npy")
    probabilities = speech_probabilities(audio)
    assert probabilities.shape == expected.shape == (-(-len(audio) // CHUNK),)
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)
    assert expected.min() < 0.05 and expected.max() > 0.99  # the clip has silence and speech
    stream = SileroStream()  # fed in pieces that do not line up with the chunks: the same bits
    for start in range(0, len(audio), 7001):
        stream.feed(audio[start : start + 7001])
    np.testing.assert_array_equal(stream.finish(), probabilities)


def test_silence_and_the_empty_input():
    assert speech_probabilities(np.zeros(0, np.float32)).shape == (0,)
    silence = speech_probabilities(np.zeros(16000 * 5, np.float32))
    assert silence.shape == (157,) and silence.max() < 0.05
