"""Results JSON -> Markdown table and PNG chart; README embedding.

python -m benchmarks.report benchmarks/results/<date>-<machine>.json   # re-render the .md and .png
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

README_START = "<!-- benchmark-results:start -->"
README_END = "<!-- benchmark-results:end -->"
CHART_FILE = "alice_ch1"  # the chart shows this file when the run has it, else the longest one
GATE_MIN_SECONDS = 60.0  # the quality gate holds on every file at least this long
GATE_WER_MARGIN = 0.003  # batched may lose at most 0.3 WER points to sequential...
GATE_TIME_RATIO = 0.7  # ...and must take at most this share of sequential's time
GATE_SYSTEMS = ("whisper_mlx-batched", "whisper_mlx", "faster-whisper-batched")


def one_line(row: dict) -> str:
    if "error" in row:
        return f"{row['label']}: FAILED {row['error'].splitlines()[-1][:200] if row['error'] else ''}"
    ratio = row.get("ratio_to_whisper_mlx")
    return (f"{row['label']}: {row['median_s']:.2f} s ({row['x_realtime']:.1f}x real time), "
            f"WER {100 * row['wer']:.1f}%, peak RSS {row['peak_rss_mib']:.0f} MiB"
            + (f", {ratio:.2f}x whisper_mlx time" if ratio is not None else ""))  # fmt: skip


def _cells(row: dict) -> list[str]:
    if "error" in row:
        reason = (row["error"].strip().splitlines() or ["?"])[-1].replace("|", "/")[:120]
        return [row["label"], "failed", "", "", "", "", reason]
    ratio = row.get("ratio_to_whisper_mlx")
    return [row["label"], f"{row['median_s']:.2f}", f"{row['x_realtime']:.1f}×", f"{100 * row['wer']:.1f}%",
            f"{row['peak_rss_mib']:.0f}", "—" if ratio is None else f"{ratio:.2f}",
            ", ".join(filter(None, [row.get("dtype"), row.get("notes")]))]  # fmt: skip


def _load_warning(machine: dict) -> list[str]:
    """A note when the machine was busy with other work during the run (timings are then inflated):
    from the CPU time in use as the run started, or (older results) from the 1-minute load average at
    the start, which lags (the end value includes the benchmark itself)."""
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    in_use, cores = machine.get("cores_in_use_start"), machine.get("cores") or 1
    if start is None and in_use is None:
        return []
    line = f"- 1-minute load average at start / end: {start} / {end}"
    busy = start is not None and start > 0.75 * cores
    if in_use is not None:
        line = f"- CPU in use by other work as the run started: {in_use} of {cores} cores ({line[2:]}; it lags)"
        busy = in_use > 0.25 * cores
    if busy:
        line += " — **the machine was busy with other work: timings are inflated; rerun on an idle machine**"
    return [line]


def file_table(data: dict, name: str) -> str:
    header = ["System", "Time (s)", "× real time", "WER", "Peak RSS (MiB)", "Time vs whisper_mlx", "Notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * 5, "---"]) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in data["results"] if r["file"] == name]
    return "\n".join(lines)


def quality_gate(data: dict) -> list[dict]:
    """Per long file: batched and sequential whisper_mlx and faster-whisper's batched pipeline, WER and
    time, and whether batched holds each target (None where a system is missing from the run)."""
    rows = []
    for f in data["files"]:
        found = {r["system"]: r for r in data["results"] if r["file"] == f["name"] and "median_s" in r}
        if f["seconds"] < GATE_MIN_SECONDS or not {GATE_SYSTEMS[0], GATE_SYSTEMS[1]} <= set(found):
            continue
        batched, sequential, faster = (found.get(key) for key in GATE_SYSTEMS)
        assert batched is not None and sequential is not None
        row = {"file": f["name"], "seconds": f["seconds"], "batched_wer": batched["wer"],
               "sequential_wer": sequential["wer"], "faster_whisper_wer": faster["wer"] if faster else None,
               "batched_s": batched["median_s"], "sequential_s": sequential["median_s"],
               "faster_whisper_s": faster["median_s"] if faster else None,
               "time_ratio": round(batched["median_s"] / sequential["median_s"], 3)}  # fmt: skip
        row["wer_vs_sequential"] = row["batched_wer"] <= row["sequential_wer"] + GATE_WER_MARGIN + 1e-9
        row["wer_vs_faster_whisper"] = None if faster is None else row["batched_wer"] <= faster["wer"] + 1e-9
        row["time_vs_sequential"] = row["time_ratio"] <= GATE_TIME_RATIO
        rows.append(row)
    return rows


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else "yes" if ok else "**no**"


def gate_markdown(rows: list[dict]) -> str:
    """The quality gate as a table: one row per long file."""
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    sec = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        "### Quality gate: batched against sequential and faster-whisper's batched pipeline, every long file",
        "",
        f"Targets: batched WER ≤ sequential WER + {100 * GATE_WER_MARGIN:.1f} points, batched WER ≤ faster-whisper "
        f"batched WER, batched time ≤ {GATE_TIME_RATIO} × sequential time.",
        "",
        "| File | Batched WER | Sequential WER | faster-whisper batched WER | Batched (s) | Sequential (s) "
        "| faster-whisper batched (s) | Batched / sequential time | ≤ seq + 0.3 | ≤ faster-whisper | time ≤ 0.7× |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['file']} | {pct(r['batched_wer'])} | {pct(r['sequential_wer'])} | "
                     f"{pct(r['faster_whisper_wer'])} | {sec(r['batched_s'])} | {sec(r['sequential_s'])} | "
                     f"{sec(r['faster_whisper_s'])} | {r['time_ratio']:.2f} | {_mark(r['wer_vs_sequential'])} | "
                     f"{_mark(r['wer_vs_faster_whisper'])} | {_mark(r['time_vs_sequential'])} |")  # fmt: skip
    return "\n".join([*lines, ""])


def markdown(data: dict) -> str:
    m = data["machine"]
    out = [
        f"## Whisper benchmark: {data['model']}, {data['date'][:10]} ({data['mode']} mode)",
        "",
        (
            f"- Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB, {m['os']}, "
            f"Python {m['python']}, MLX {m['mlx']}"
        ),
        (
            f"- BLAS preloaded for the MLX peers: `{m.get('blas_preloaded_for_mlx_peers') or 'none'}` "
            '("as installed" rows: none, as their users get it)'
        ),
        (
            f"- MLX weights: {data['mlx_dtype']} (converted once with `python -m whisper_mlx.convert`); "
            "faster-whisper: the same checkpoint as CTranslate2"
        ),
        (
            f"- Time: median of {data['runs']} run(s) after one warm-up on `{data['warmup_file']}` "
            f"({data['long_runs']} on generated long files); audio decoded once, outside the timing"
            + (
                "; the runs are rounds: every system once per round, each in a fresh process (load, warm-up, "
                "one timed run)"
                if data.get("rounds")
                else ""
            )
        ),
        (
            "- × real time: audio seconds / time. WER: jiwer on `benchmarks/normalize.py`-normalised text. "
            "Peak RSS: the runner process's ru_maxrss (model + warm-up + runs). "
            "Time vs whisper_mlx: time / whisper_mlx (batched 12) time on the same file in the same run"
        ),
        f"- Command: `{data['command']}`",
        *_load_warning(m),
        "",
    ]
    gate = quality_gate(data)
    if gate:
        out += [gate_markdown(gate), ""]
    for f in data["files"]:
        out += [
            f"### {f['name']} ({f['seconds']:.1f} s, sha256 `{f['sha256'][:16]}…`)",
            "",
            file_table(data, f["name"]),
            "",
        ]
    if data.get("memory"):
        from .memory import memory_markdown

        out.append(memory_markdown(data["memory"]))
    return "\n".join(out)


def chart_file(data: dict) -> str | None:
    names = [
        f["name"] for f in data["files"] if any(r["file"] == f["name"] and "median_s" in r for r in data["results"])
    ]
    if CHART_FILE in names:
        return CHART_FILE
    listed = [f for f in data["files"] if f["name"] in names]
    return max(listed, key=lambda f: f["seconds"])["name"] if listed else None


def chart(data: dict, path: Path) -> Path | None:
    """Two side-by-side horizontal bar panels (time, WER) for one file; None when nothing succeeded."""
    name = chart_file(data)
    if name is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["file"] == name and "median_s" in r][::-1]
    labels = [r["label"] for r in rows]
    colors = [_color(r["system"]) for r in rows]
    seconds = next(f["seconds"] for f in data["files"] if f["name"] == name)
    fig, (ax_time, ax_wer) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * len(rows)), sharey=True)
    _bars(ax_time, labels, [r["median_s"] for r in rows], colors, "Time (s), lower is faster",
          [f"{_seconds(r['median_s'])}  ({r['x_realtime']:.1f}× real time)" for r in rows], floor=0.1)  # fmt: skip
    _bars(ax_wer, labels, [100 * r["wer"] for r in rows], colors, "WER (%), lower is better",
          [f"{100 * r['wer']:.1f}%" for r in rows], floor=5.0)  # fmt: skip
    fig.suptitle(f"{data['model']} on {name} ({seconds:.0f} s audio) — {data['machine']['cpu']}, "
                 f"{data['machine']['cores']} cores, {data['date'][:10]}", fontsize=11)  # fmt: skip
    from matplotlib.patches import Patch

    used = dict.fromkeys(_group(r["system"]) for r in rows[::-1])
    fig.legend(handles=[Patch(color=_GROUPS[g][0], label=_GROUPS[g][1]) for g in used], loc="lower center",
               ncol=len(used), frameon=False, fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06 if len(rows) > 3 else 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_GROUPS = {
    "whisper_mlx": ("#d95f02", "whisper_mlx"),
    "mlx-peer": ("#7570b3", "MLX peers (optimized BLAS)"),
    "as-installed": ("#bcb8dd", "MLX peers as installed"),
    "faster-whisper": ("#1b9e77", "faster-whisper (CTranslate2)"),
}


def _group(key: str) -> str:
    if key.startswith("whisper_mlx"):
        return "whisper_mlx"
    if key.endswith("as-installed"):
        return "as-installed"
    return "faster-whisper" if key.startswith("faster-whisper") else "mlx-peer"


def _color(key: str) -> str:
    return _GROUPS[_group(key)][0]


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _bars(ax, labels, values, colors, title, texts, floor: float) -> None:
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max([*values, floor]) * 1.45)
    for y, (value, text) in enumerate(zip(values, texts)):
        ax.text(value, y, " " + text, va="center", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def write_outputs(data: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["markdown"].write_text(markdown(data))
    try:
        png = chart(data, out_dir / f"{stem}.png")
    except ImportError as exc:
        print(f"no PNG chart: {exc} (pip install -e '.[bench]')", file=sys.stderr)
        png = None
    if png is not None:
        paths["png"] = png
    return paths


def update_readme(readme: Path, data: dict, paths: dict[str, Path]) -> None:
    """Replace the block between the README markers with this run's table and chart."""
    rel = {
        k: p.relative_to(readme.parent).as_posix() if p.is_relative_to(readme.parent) else str(p)
        for k, p in paths.items()
    }
    block = [README_START, "", markdown(data).replace("## ", "### ", 1).replace("\n### ", "\n#### "), ""]
    if "png" in rel:
        block.insert(1, f"![time and WER per system]({rel['png']})\n")
    block += [f"Raw results: [{rel['json']}]({rel['json']})", README_END]
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{README_START}\n{README_END}\n"
    if README_START not in text:
        text += f"\n{README_START}\n{README_END}\n"
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.DOTALL)
    readme.write_text(pattern.sub(lambda _: "\n".join(block), text))


def main(argv: list[str] | None = None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        data = json.loads(path.read_text())
        print(", ".join(str(p) for p in write_outputs(data, path.parent, path.stem).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
