"""Fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `shared/` folder beside the repository (data and model fixtures)."""
    path = REPO.parent / "shared"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: tests need the shared fixtures beside the repository")
    return path


@pytest.fixture(scope="session")
def stories_gguf(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260K" / "stories260K.gguf"


@pytest.fixture
def hearth_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HEARTH_HOME for one test: config, data and cache under tmp_path."""
    home = tmp_path / "hearth-home"
    monkeypatch.setenv("HEARTH_HOME", str(home))
    return home


@pytest.fixture(autouse=True, scope="session")
def _isolated_default_home(tmp_path_factory: pytest.TempPathFactory):
    """No test touches the real user's folders: HEARTH_HOME defaults to a temporary one."""
    if "HEARTH_HOME" not in os.environ:
        os.environ["HEARTH_HOME"] = str(tmp_path_factory.mktemp("default-hearth-home"))
    yield


@pytest.fixture(scope="session")
def stories_hf_dir(stories_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K as a Hugging Face folder (config, safetensors, tokenizer), saved by transformers
    from the model store's GGUF loader: a tiny real model for local-folder and hub tests."""
    from training.model_store import load_torch, resolve

    model, tokenizer = load_torch(resolve(str(stories_gguf)))
    folder = tmp_path_factory.mktemp("stories260K-hf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub_model_dir(stories_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files a test hub serves: a 23 MB model (tests/hub_helpers.py)."""
    from hub_helpers import make_hub_model

    folder = tmp_path_factory.mktemp("hub-model")
    make_hub_model(folder, stories_hf_dir)
    return folder


@pytest.fixture
def hub_mirror(hub_model_dir: Path):
    """A hub on loopback serving `hub_model_dir` (tests/hub_helpers.py)."""
    from hub_helpers import serve_mirror

    with serve_mirror({p.name: p.read_bytes() for p in sorted(hub_model_dir.iterdir()) if p.is_file()}) as mirror:
        yield mirror
