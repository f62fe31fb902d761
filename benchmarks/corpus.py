"""The benchmark corpus: manifest, sha256, decoding to 16 kHz mono, and the generated long file.

Every system gets the very same samples: each file is decoded once here with PyAV (resampled to
16 kHz mono s16 like openai's ``ffmpeg -ac 1 -ar 16000 -f s16le``, then /32768 as float32) and
cached as ``.npy``; the runners load that array. Audio decoding is therefore excluded from every
system's timing (mlx-whisper and lightning shell out to ffmpeg, which this machine lacks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"
CACHE_DIR = BENCH_DIR / ".cache"
SAMPLE_RATE = 16000


@dataclass
class AudioFile:
    name: str
    audio: Path  # the original (or generated) audio file
    reference: str  # reference transcript
    language: str
    sha256: str  # of the audio file
    seconds: float
    samples: Path  # cached decoded float32 16 kHz mono .npy


def load_manifest() -> dict:
    return json.loads((DATA_DIR / "manifest.json").read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_audio(path: Path) -> np.ndarray:
    """Decode any audio file to float32 mono 16 kHz in [-1, 1)."""
    import av

    chunks = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not chunks:
        raise ValueError(f"{path}: no audio decoded")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def write_flac(samples: np.ndarray, path: Path) -> None:
    """Write float32 mono 16 kHz samples as a 16-bit FLAC file."""
    import av

    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        for start in range(0, len(pcm), SAMPLE_RATE * 10):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + SAMPLE_RATE * 10], format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _cached_samples(audio: Path, sha256: str, cache_dir: Path) -> Path:
    target = cache_dir / "audio" / f"{audio.stem}-{sha256[:12]}.npy"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, decode_audio(audio))
    return target


def _from_entry(entry: dict, cache_dir: Path) -> AudioFile:
    audio = DATA_DIR / entry["audio"]
    if not audio.exists():
        raise FileNotFoundError(f"{audio}: missing (benchmarks/data links into tests/data)")
    sha = sha256_file(audio)
    samples = _cached_samples(audio, sha, cache_dir)
    seconds = len(np.load(samples, mmap_mode="r")) / SAMPLE_RATE
    reference = (DATA_DIR / entry["reference"]).read_text().strip()
    return AudioFile(entry["name"], audio, reference, entry.get("language", "en"), sha, seconds, samples)


def _sources(entry: dict) -> list[str]:
    """The listed files a generated entry is made from."""
    if "concatenate" in entry:
        return list(entry["concatenate"])
    if "excerpt" in entry or "delay" in entry:
        return [entry.get("excerpt") or entry["delay"]]
    return [entry["mix"], *([entry["babble_from"]] if "babble_from" in entry else [])]


def _noisy(entry: dict, parts: dict[str, AudioFile]) -> np.ndarray:
    """The entry's speech file with its noise mixed in at its SNR (fixed seed: the same file every time)."""
    from .noise import babble_noise, brown_noise, mix_at_snr

    speech = np.load(parts[entry["mix"]].samples)
    if entry["noise"] == "brown":
        noise = brown_noise(len(speech), entry["seed"])
    elif entry["noise"] == "babble":
        noise = babble_noise(np.load(parts[entry["babble_from"]].samples), len(speech), entry["seed"])
    else:
        raise SystemExit(f"{entry['name']}: unknown noise {entry['noise']!r} (brown or babble)")
    return mix_at_snr(speech, noise, entry["snr_db"])


def _generate(entry: dict, parts: dict[str, AudioFile], cache_dir: Path) -> AudioFile:
    """Concatenate decoded parts, cut an excerpt of one, delay one, or mix one with noise, into a FLAC under the
    cache (once; a noisy file's name carries a digest of its recipe), then treat it like any file."""
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:8]
    recipe = "" if "concatenate" in entry else f"-{digest}"
    audio = cache_dir / "audio" / f"{entry['name']}{recipe}.flac"
    if not audio.exists():
        if "concatenate" in entry:
            write_flac(np.concatenate([np.load(parts[name].samples) for name in entry["concatenate"]]), audio)
        elif "excerpt" in entry:
            start, end = (round(t * SAMPLE_RATE) for t in entry["seconds"])
            write_flac(np.load(parts[entry["excerpt"]].samples)[start:end], audio)
        elif "delay" in entry:
            silence = np.zeros(round(entry["silence_s"] * SAMPLE_RATE), np.float32)
            write_flac(np.concatenate([silence, np.load(parts[entry["delay"]].samples)]), audio)
        else:
            write_flac(_noisy(entry, parts), audio)
    sha = sha256_file(audio)
    samples = _cached_samples(audio, sha, cache_dir)
    seconds = len(np.load(samples, mmap_mode="r")) / SAMPLE_RATE
    if "excerpt" in entry:  # the reference's words spoken between the excerpt's cuts
        first, last = entry["words"]
        reference = " ".join(parts[entry["excerpt"]].reference.split()[first:last])
    else:
        spoken = entry.get("concatenate", [entry.get("mix") or entry.get("delay")])
        reference = " ".join(parts[name].reference for name in spoken)
    return AudioFile(entry["name"], audio, reference, entry.get("language", "en"), sha, seconds, samples)


def load_corpus(names: list[str] | None = None, cache_dir: Path = CACHE_DIR) -> list[AudioFile]:
    """The requested files (all listed and generated ones when ``names`` is None), in the given order."""
    manifest = load_manifest()
    listed = {e["name"]: e for e in manifest["files"]}
    generated = {e["name"]: e for e in manifest.get("generated", [])}
    wanted = names if names is not None else list(listed) + list(generated)
    unknown = [n for n in wanted if n not in listed and n not in generated]
    if unknown:
        raise SystemExit(f"unknown corpus file(s) {unknown}; known: {sorted(listed) + sorted(generated)}")
    needed = set(wanted) | {p for n in wanted if n in generated for p in _sources(generated[n])}
    parts = {n: _from_entry(listed[n], cache_dir) for n in listed if n in needed}
    return [parts[n] if n in listed else _generate(generated[n], parts, cache_dir) for n in wanted]
