"""`python -m benchmarks.run --memory`: whisper_mlx's peak RSS on a 10-minute and a 2-hour file.

Both files are alice_ch1 repeated (and cut) to length, written once as FLAC into
benchmarks/.cache/audio/. whisper_mlx decodes them itself (``transcribe(path, batch_size=12)``),
so audio decoding and the log-mel are part of the measurement. Each runs in its own subprocess
(`benchmarks/runners/memory_runner.py`); peak RSS is that process's ``ru_maxrss``. Bounded memory
means the 2-hour peak stays within TARGET_RATIO of the 10-minute peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .corpus import CACHE_DIR, SAMPLE_RATE, load_corpus
from .systems import BY_KEY, RUNNER_DIR, run_measurement

LONG_FILES = (("long_10min", 600), ("long_2h", 7200))
SOURCE = "alice_ch1"
TARGET_RATIO = 1.5
BATCH_SIZE = 12
_FRAME_SAMPLES = SAMPLE_RATE * 10


def _repeated_frames(source: np.ndarray, total: int):
    """int16 mono frames of `source` repeated back to back, `total` samples in all."""
    import av

    pcm = np.clip(np.round(source * 32768.0), -32768, 32767).astype(np.int16)
    written = 0
    while written < total:
        offset = written % pcm.size
        block = pcm[offset : offset + min(_FRAME_SAMPLES, total - written)]
        frame = av.AudioFrame.from_ndarray(block[None], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        written += block.size
        yield frame


def generate_long_file(name: str, seconds: int, cache_dir: Path = CACHE_DIR) -> Path:
    """`cache_dir/audio/<name>.flac`: alice_ch1 repeated to `seconds` (written once, never in memory whole)."""
    import av

    target = cache_dir / "audio" / f"{name}.flac"
    if target.exists():
        return target
    source = np.load(load_corpus([SOURCE], cache_dir)[0].samples)
    partial = target.with_suffix(".partial.flac")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(partial), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        for frame in _repeated_frames(source, seconds * SAMPLE_RATE):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    partial.replace(target)
    return target


def measure_file(audio: Path, model: Path, timeout: float, batch_size: int = BATCH_SIZE) -> dict:
    """Run the memory runner on one file; its result dict, or {"error": ...}."""
    command = [sys.executable, str(RUNNER_DIR / "memory_runner.py"), "--model", str(model), "--audio", str(audio),
               "--batch-size", str(batch_size)]  # fmt: skip
    return run_measurement(BY_KEY["whisper_mlx"], command, timeout)


def memory_row(name: str, seconds: int, audio: Path, raw: dict) -> dict:
    row = {"file": name, "audio_seconds": seconds, "audio": str(audio), "batch_size": BATCH_SIZE}
    if "error" in raw:
        return {**row, "error": raw["error"]}
    return {**row, "peak_rss_mib": round(raw["peak_rss_bytes"] / 2**20, 1),
            "peak_rss_after_load_mib": round(raw["peak_rss_after_load_bytes"] / 2**20, 1),
            "seconds": round(raw["seconds"], 2), "segments": raw["segments"],
            "text_chars": raw["text_chars"]}  # fmt: skip


def run_memory(model: Path, timeout: float, files=LONG_FILES) -> dict:
    """Measure every long file; {"rows": [...], "ratio": 2-hour peak / 10-minute peak, "target": ...}."""
    rows = []
    for name, seconds in files:
        audio = generate_long_file(name, seconds)
        print(f"-- memory: whisper_mlx batched {BATCH_SIZE} on {name} ({seconds} s) ...", flush=True)
        rows.append(memory_row(name, seconds, audio, measure_file(audio, model, timeout)))
        print("   " + memory_line(rows[-1]), flush=True)
    peaks = [r.get("peak_rss_mib") for r in rows]
    ratio = round(peaks[-1] / peaks[0], 3) if len(peaks) > 1 and None not in peaks else None
    return {"rows": rows, "ratio": ratio, "target_ratio": TARGET_RATIO,
            "bounded": ratio is not None and ratio <= TARGET_RATIO}  # fmt: skip


def memory_line(row: dict) -> str:
    if "error" in row:
        return f"{row['file']}: FAILED {row['error'].splitlines()[-1][:200] if row['error'] else ''}"
    return (f"{row['file']}: peak RSS {row['peak_rss_mib']:.0f} MiB (after model load "
            f"{row['peak_rss_after_load_mib']:.0f} MiB), {row['seconds']:.0f} s")  # fmt: skip


def memory_markdown(memory: dict) -> str:
    """The memory section of the report."""
    lines = ["### Memory: whisper_mlx batched 12 on long files (audio decoded by whisper_mlx)", "",
             "| File | Audio (s) | Peak RSS (MiB) | After model load (MiB) | Time (s) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in memory["rows"]:
        if "error" in row:
            lines.append(f"| {row['file']} | {row['audio_seconds']} | failed | | |")
        else:
            lines.append(f"| {row['file']} | {row['audio_seconds']} | {row['peak_rss_mib']:.0f} | "
                         f"{row['peak_rss_after_load_mib']:.0f} | {row['seconds']:.0f} |")  # fmt: skip
    ratio = memory.get("ratio")
    verdict = "n/a" if ratio is None else f"{ratio:.2f}× ({'within' if memory['bounded'] else 'above'} " \
                                           f"the {memory['target_ratio']}× target)"  # fmt: skip
    return "\n".join([*lines, "", f"Peak RSS ratio, 2 h / 10 min: {verdict}", ""])
