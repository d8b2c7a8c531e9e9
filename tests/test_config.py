"""Paths (platformdirs, HEARTH_HOME) and the TOML config validated against the shipped defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import default_values, load_config, set_value
from core.errors import HearthError
from core.paths import hearth_paths

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_hearth_home_overrides_every_folder(hearth_home: Path):
    paths = hearth_paths()
    assert paths.config_file == hearth_home.resolve() / "config" / "config.toml"
    assert paths.data_dir == hearth_home.resolve() / "data"
    assert paths.hub_cache_dir == hearth_home.resolve() / "cache" / "hub"
    assert paths.models_dir.parent == paths.data_dir


def test_without_hearth_home_platformdirs_decides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import platformdirs

    monkeypatch.delenv("HEARTH_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    paths = hearth_paths()
    assert paths.config_dir == Path(platformdirs.user_config_dir("hearth"))
    assert paths.config_dir == tmp_path / "xdg-config" / "hearth"
    assert paths.data_dir == tmp_path / "xdg-data" / "hearth"
    assert paths.cache_dir == tmp_path / "xdg-cache" / "hearth"


def test_no_config_file_gives_the_defaults(hearth_home: Path):
    config = load_config()
    assert config.values == default_values()
    assert config.get("chat.model") == "smollm2-135m"
    assert config.user_values == {}


def write_config(text: str) -> Path:
    path = hearth_paths().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


def test_user_values_override_defaults(hearth_home: Path):
    write_config('[chat]\ntemperature = 0.2\nmodel = "my.gguf"\n')
    config = load_config()
    assert config.get("chat.temperature") == 0.2 and config.get("chat.model") == "my.gguf"
    assert config.get("chat.top_p") == default_values()["chat"]["top_p"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[chat]\ntemprature = 0.2\n", "unknown key chat.temprature"),
        ("[chatt]\nmodel = 'x'\n", "unknown section [chatt]"),
        ("[chat]\ntemperature = 'hot'\n", "chat.temperature must be a number, got 'hot'"),
        ("[chat]\nmax_tokens = true\n", "chat.max_tokens must be a number, got True"),
        ("[chat]\ntop_p = 1.5\n", "chat.top_p must be between 0.0 and 1.0, got 1.5"),
        ("[serve]\nport = 70000\n", "serve.port must be a port number"),
        ("[mesh]\nkind = 'toaster'\n", "mesh.kind must be one of laptop, desktop, phone"),
        ("chat = 3\n", "chat must be a table"),
        ("[keys]\nquit = 3\n", "keys.quit must be a string"),
        ("[chat\nmodel = 'x'\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(hearth_home: Path, text: str, message: str):
    path = write_config(text)
    with pytest.raises(HearthError) as err:
        load_config()
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_set_value_validates_and_keeps_the_file_whole(hearth_home: Path):
    config = set_value("chat.temperature", 0.3)
    assert config.get("chat.temperature") == 0.3
    before = hearth_paths().config_file.read_text("utf-8")
    with pytest.raises(HearthError, match="unknown key chat.colour"):
        set_value("chat.colour", "red")
    assert hearth_paths().config_file.read_text("utf-8") == before
    assert load_config().user_values == {"chat": {"temperature": 0.3}}
    assert not [p for p in hearth_paths().config_dir.iterdir() if p.name.endswith(".part")]


def test_cli_with_bad_config_exits_2_with_one_line(hearth_home: Path):
    path = write_config("[chat]\ntemprature = 0.2\n")
    done = subprocess.run([sys.executable, "-m", "app", "chat"], input="", capture_output=True, text=True,
                          env=dict(os.environ, HEARTH_HOME=str(hearth_home)), cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"hearth: {path}: unknown key chat.temprature"
