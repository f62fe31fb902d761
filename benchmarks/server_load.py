"""Load test of `whisper_mlx serve`: N clients at once against the same N requests one after another.

The server is `whisper_mlx serve` in a process of its own (tiny.en, one BatchEngine) on a free localhost
port; the clients are threads of this process sending distinct clips of alice_ch1 with the openai
client. Writes a markdown report:

    python -m benchmarks.server_load --clients 8 --shortest 10 --longest 30 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from whisper_mlx.audio import SAMPLE_RATE, load_audio

from .machine import cpu_description, machine_slug

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT.parent / "tests" / "data" / "alice_ch1.flac"
FIRST_OFFSET_S = 5.0  # past the chapter's title


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def clip_lengths(count: int, shortest: float, longest: float) -> list[float]:
    """Lengths spread evenly from `shortest` to `longest` seconds."""
    if count == 1:
        return [shortest]
    return [shortest + (longest - shortest) * i / (count - 1) for i in range(count)]


def clips(lengths: list[float]) -> list[bytes]:
    """Distinct, consecutive stretches of alice_ch1 of the given lengths, as WAV files in memory."""
    audio = load_audio(str(SOURCE))
    bounds = np.cumsum([0.0, *lengths]) + FIRST_OFFSET_S
    if bounds[-1] * SAMPLE_RATE > len(audio):
        raise SystemExit(f"alice_ch1 is shorter than {bounds[-1]:.0f} s")
    return [wav_bytes(audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]) for a, b in itertools.pairwise(bounds)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(batch_size: int) -> Iterator[tuple[subprocess.Popen, int]]:
    """`whisper_mlx serve` on a free port until the block ends (interrupted as a user would)."""
    port = free_port()
    command = [sys.executable, "-m", "whisper_mlx", "serve", "--port", str(port), "--batch-size", str(batch_size)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(port):
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            time.sleep(0.2)
        yield server, port
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def request(client: openai.OpenAI, index: int, audio: bytes) -> str:
    return client.audio.transcriptions.create(model="whisper-1", file=(f"clip{index}.wav", audio)).text


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, user and system (Linux: /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(run, client: openai.OpenAI, audios: list[bytes], pid: int) -> tuple[float, float, list[str]]:
    """Wall seconds, the server's CPU seconds and the texts of `run`."""
    wall, cpu = time.perf_counter(), cpu_seconds(pid)
    texts = run(client, audios)
    return time.perf_counter() - wall, cpu_seconds(pid) - cpu, texts


def one_after_another(client: openai.OpenAI, audios: list[bytes]) -> list[str]:
    return [request(client, i, audio) for i, audio in enumerate(audios)]


def all_at_once(client: openai.OpenAI, audios: list[bytes]) -> list[str]:
    with ThreadPoolExecutor(len(audios)) as pool:
        return list(pool.map(lambda pair: request(client, *pair), enumerate(audios)))


def measure(port: int, pid: int, audios: list[bytes], rounds: int) -> dict:
    """Wall and CPU times of both ways per round (which goes first alternates, as the machine's other
    load drifts); checks both return the same texts."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=1800)
    request(client, 0, audios[0])  # warm-up: first-use costs out of both timings
    times: dict[str, list] = {"sequential": [], "concurrent": []}
    texts: dict[str, list] = {}
    for round_index in range(rounds):
        ways = [("sequential", one_after_another), ("concurrent", all_at_once)]
        for name, run in ways if round_index % 2 == 0 else ways[::-1]:
            wall, cpu, texts[name] = timed(run, client, audios, pid)
            times[name].append((wall, cpu))
    return {**times, "same_text": texts["sequential"] == texts["concurrent"]}


def median(pairs: list[tuple[float, float]], index: int) -> float:
    return statistics.median(pair[index] for pair in pairs)


def report(args: argparse.Namespace, numbers: dict, audio_seconds: float) -> str:
    sequential, concurrent = numbers["sequential"], numbers["concurrent"]
    wall_ratio = median(sequential, 0) / median(concurrent, 0)
    cpu_ratio = median(sequential, 1) / median(concurrent, 1)
    rows = [("one after another", sequential), (f"{args.clients} clients at once", concurrent)]
    lines = [
        f"# Server load: {args.clients} clients at once vs one after another",
        "",
        f"- machine: {cpu_description()} ({machine_slug()}), shared with other work while it ran",
        f"- command: `python -m benchmarks.server_load --clients {args.clients} --shortest {args.shortest:g} "
        f"--longest {args.longest:g} --rounds {args.rounds} --batch-size {args.batch_size}`",
        f"- server: `whisper_mlx serve --batch-size {args.batch_size}` (tiny.en) in its own process; clients:"
        " threads of the benchmark's process with the openai package, response_format json",
        f"- requests: {args.clients} distinct clips of alice_ch1 (WAV) of {args.shortest:g} to {args.longest:g} s, "
        f"{audio_seconds:.0f} s of audio in all; medians of {args.rounds} rounds after one warm-up request",
        "- CPU time: the server process's, all threads; less sensitive than wall time to the other work on the machine",
        "",
        "| requests | wall time (s) | audio s per wall s | CPU time (s) | rounds: wall / CPU (s) |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {name} | {median(pairs, 0):.2f} | {audio_seconds / median(pairs, 0):.1f} | {median(pairs, 1):.2f} | "
            + ", ".join(f"{wall:.1f} / {cpu:.1f}" for wall, cpu in pairs)
            + " |"
            for name, pairs in rows
        ],
        "",
        f"Throughput ratio (one after another / at once): **{wall_ratio:.2f}x** in wall time, "
        f"{cpu_ratio:.2f}x in CPU time. Same texts both ways: {'yes' if numbers['same_text'] else 'no'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--shortest", type=float, default=10.0, help="the shortest client's clip, in seconds")
    parser.add_argument("--longest", type=float, default=30.0, help="the longest client's clip, in seconds")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--output", type=Path, default=None, help="report path (default: benchmarks/results/...)")
    args = parser.parse_args()
    lengths = clip_lengths(args.clients, args.shortest, args.longest)
    audios = clips(lengths)
    with running_server(args.batch_size) as (server, port):
        numbers = measure(port, server.pid, audios, args.rounds)
    text = report(args, numbers, sum(lengths))
    day = datetime.date.today().isoformat()
    output = args.output or ROOT / "results" / f"{day}-{machine_slug()}-server-load.md"
    output.write_text(text)
    print(text)
    print(f"written: {output}")


if __name__ == "__main__":
    main()
