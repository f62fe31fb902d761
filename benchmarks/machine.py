"""What machine a run happened on, and which optimized BLAS the MLX peers get preloaded."""

from __future__ import annotations

import glob
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata


def cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_detail(path: str = "/proc/cpuinfo") -> str | None:
    """Family, model and widest vector unit from /proc/cpuinfo (Linux x86): virtual machines often name
    their CPU only "AMD EPYC", which covers generations with and without AVX-512."""
    fields: dict[str, str] = {}
    try:
        with open(path) as info:
            for line in info:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    if "cpu family" not in fields:
        return None
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in _VECTOR_UNITS if flag in flags), "SSE")
    return f"family {fields['cpu family']} model {fields.get('model', '?')}, {vector}"


_VECTOR_UNITS = (("amx_tile", "AVX-512 + AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))


def cpu_description() -> str:
    """The CPU's name with its family, model and vector unit where known."""
    detail = cpu_detail()
    return f"{cpu_model()} ({detail})" if detail else cpu_model()


def machine_slug() -> str:
    """Short file-name-safe name of this machine, e.g. ``linux-x86_64-2cpu-intel-xeon-platinum-8481c``."""
    model = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor|\d+-core", "", cpu_model().lower())
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-")[:40].strip("-")
    return f"{sys.platform.rstrip('0123456789')}-{platform.machine().lower()}-{os.cpu_count()}cpu-{model}"


def optimized_blas() -> str | None:
    """The BLAS library whisper_mlx preloads (so the MLX peers get the very same one), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        from whisper_mlx.runtime import find_blas
    except ImportError:
        candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
        return candidates[0] if candidates else None
    choice = find_blas()
    return choice[1] if choice else None


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    uname = platform.uname()
    return {
        "slug": machine_slug(),
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "arch": uname.machine,
        "os": f"{uname.system} {uname.release}",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "memory_gib": _memory_gib(),
        "mlx": _version("mlx"),
        "blas_preloaded_for_mlx_peers": optimized_blas(),
        "load_average_start": load_average(),
        "cores_in_use_start": cores_in_use(),
    }


def cores_in_use(seconds: float = 2.0) -> float | None:
    """Cores' worth of CPU time the machine spends over the next `seconds` (Linux /proc/stat): the other
    work running as the benchmark starts. (The 1-minute load average lags: work that ended a minute ago
    still shows in it.)"""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2)


def load_average() -> float | None:
    """1-minute load average: other work on the machine skews every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None
