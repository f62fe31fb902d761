"""The BLAS preload's process settings, checked in fresh interpreters (they apply at import)."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, whisper_mlx; print(whisper_mlx.backend_info()['blas'], os.environ.get('KMP_BLOCKTIME'), sep='|')"


def probe(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("KMP_BLOCKTIME", "WHISPER_MLX_BLAS")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env={**clean, **env}, check=True
    )
    return done.stdout.strip().split("|")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_mkl_preload_stops_openmp_spinning_unless_the_user_chose():
    blas, blocktime = probe()
    if blas != "mkl":
        pytest.skip(f"MKL is not installed here (BLAS: {blas}); nothing to set")
    assert blocktime == "0"
    assert probe(KMP_BLOCKTIME="50") == ["mkl", "50"]  # the user's own setting is kept
    assert probe(WHISPER_MLX_BLAS="off")[1] == "None"  # no MKL loaded by us: nothing touched
