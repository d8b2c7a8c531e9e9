"""The wheel carries what the product reads at run time: the assets and the app's styles."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_assets_and_styles(tmp_path: Path):
    # A copy of the tree, so the build's own folders (build/, *.egg-info) stay out of the checkout.
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    wanted = {p.relative_to(source).as_posix() for p in (source / "assets").rglob("*.toml")}
    wanted |= {p.relative_to(source).as_posix() for p in (source / "assets").rglob("*.jsonl")}
    wanted |= {p.relative_to(source).as_posix() for p in source.rglob("*.tcss")}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("hearthmesh-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())

    assert {"assets/catalog.toml", "assets/default_config.toml"} <= wanted
    # the anchor's general chats (training/anchor.py) and the general questions of the benchmark
    assert {"assets/train/general_anchor.jsonl", "assets/eval/general_questions.jsonl"} <= wanted
    assert wanted <= inside, sorted(wanted - inside)
    assert "app/cli.py" in inside and "training/model_store.py" in inside
    assert not [n for n in inside if n.startswith("tests/")]
