"""What Hearth writes is readable by its own account only, on a computer shared by several.

The chat history was created 0644 in a 0755 folder: any other account on the family computer
could read every conversation (and the activation caches, hidden states of the private text).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _chat(home: Path) -> None:
    # A permissive umask, as many systems have: Hearth must not depend on it.
    done = subprocess.run(["/bin/sh", "-c", f'umask 022; exec "{sys.executable}" -m app chat --max-tokens 4'],
                          input="Hello\n", env=dict(os.environ, HEARTH_HOME=str(home)), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_new_install_is_private(tmp_path):
    home = tmp_path / "home"
    _chat(home)
    assert _mode(home / "data") == 0o700
    assert _mode(home / "data" / "history.sqlite3") == 0o600
    assert not [p for p in home.rglob("*") if p.is_file() and _mode(p) & 0o077]


@pytest.mark.slow
def test_an_older_install_is_made_private(tmp_path):
    home = tmp_path / "home"
    _chat(home)
    for folder in ("config", "data", "cache"):
        (home / folder).mkdir(exist_ok=True)
        (home / folder).chmod(0o755)      # as an install from before this rule left them
    _chat(home)
    assert [_mode(home / folder) for folder in ("config", "data", "cache")] == [0o700] * 3
