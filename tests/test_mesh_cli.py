"""The mesh commands as a person (or a script) runs them: worker, pair, devices, unpair.

Real processes on loopback, each with its own HEARTH_HOME; pairing goes by address here (mDNS
between hosts is covered by test_mesh_netns.py). Answers are typed on stdin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import HostProcess

HEARTH = str(Path(sys.executable).parent / "hearth")
REPO = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict:
    return {**os.environ, "HEARTH_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _start(home: Path, *args: str, stderr: Path) -> HostProcess:
    popen = subprocess.Popen([HEARTH, *args], cwd=REPO, env=_env(home), text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=open(stderr, "w"), bufsize=1)
    return HostProcess(popen, stderr)


def _run(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([HEARTH, *args], cwd=REPO, env=_env(home), input=stdin, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_worker_pair_devices_unpair_from_the_command_line(tmp_path):
    worker_home, my_home = tmp_path / "worker", tmp_path / "me"
    worker = _start(worker_home, "worker", "--name", "den-desktop", "--kind", "desktop", "--interface", "127.0.0.1",
                    stderr=tmp_path / "worker.err")
    try:
        port = int(worker.wait_for(r"on port (\d+)", 60).group(1))
        worker_id = worker.wait_for(r"Device id: (\S+)").group(1)
        pair = _start(my_home, "pair", f"127.0.0.1:{port}", "--json", stderr=tmp_path / "pair.err")
        pair.send_line("y")                                  # this side confirms the code
        worker.wait_for(r"Accept\? \[y/N\]", 30)
        worker_code = worker.wait_for(r"Code: (\d{6})").group(1)
        worker.send_line("y")                                # the worker's person accepts
        assert pair.wait(60) == 0, pair.stderr()
        result = json.loads("\n".join(pair.lines))
        assert result == {"paired": True, "id": worker_id, "name": "den-desktop", "code": worker_code,
                          "message": "paired with den-desktop"}
        assert "Code: " + worker_code in pair.stderr()  # the code was shown here too

        listing = _run(my_home, "devices", "--json", "--wait", "0.5", "--interface", "127.0.0.1",
                       "--add", f"127.0.0.1:{port}")
        assert listing.returncode == 0, listing.stderr
        devices = json.loads(listing.stdout)["devices"]
        row = next(d for d in devices if d["id"] == worker_id)
        assert {k: row[k] for k in ("name", "kind", "addresses", "port", "paired")} == {
            "name": "den-desktop", "kind": "desktop", "addresses": ["127.0.0.1"], "port": port, "paired": True}
        assert set(row) == {"id", "short_id", "name", "kind", "addresses", "port", "paired", "state",
                            "accepts_pairing", "last_seen"}

        again = _run(my_home, "pair", f"127.0.0.1:{port}", "--yes")
        assert again.returncode == 2 and "already paired" in again.stderr

        gone = _run(my_home, "unpair", "den-desktop", "--json")
        assert gone.returncode == 0, gone.stderr
        assert json.loads(gone.stdout) == {"unpaired": True, "id": worker_id, "name": "den-desktop"}
        assert not list((my_home / "data" / "trusted").glob("*.json"))
        deadline = time.monotonic() + 5  # the worker was told, and forgot us too
        while list((worker_home / "data" / "trusted").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list((worker_home / "data" / "trusted").glob("*.json"))
    finally:
        code = worker.stop(signal.SIGTERM)
    assert code == 0
    assert worker.lines[-1] == "Stopped; the mDNS record is withdrawn."


@pytest.mark.slow
def test_no_pairing_worker_refuses_and_bad_addresses_fail_cleanly(tmp_path):
    worker = _start(tmp_path / "w", "worker", "--no-pairing", "--interface", "127.0.0.1", stderr=tmp_path / "w.err")
    try:
        port = int(worker.wait_for(r"on port (\d+)", 60).group(1))
        worker.wait_for(r"^Pairing: refused \(--no-pairing\)$")
        refused = _run(tmp_path / "me", "pair", f"127.0.0.1:{port}", "--yes")
        assert refused.returncode == 1 and "does not accept pairing" in refused.stderr
    finally:
        code = worker.stop(signal.SIGHUP)             # its terminal closed
    assert code == 0 and worker.lines[-1] == "Stopped; the mDNS record is withdrawn."
    nobody = _run(tmp_path / "me", "pair", f"127.0.0.1:{port}", "--yes")
    assert nobody.returncode == 2 and nobody.stderr.startswith("hearth: cannot reach a Hearth device at 127.0.0.1:")
    unknown = _run(tmp_path / "me", "unpair", "nobody")
    assert unknown.returncode == 2 and "no device called 'nobody'" in unknown.stderr


@pytest.mark.slow
def test_one_app_or_worker_per_device(tmp_path):
    # Both would be this device on the mesh (one identity advertised twice, two trust stores
    # and job lists drifting apart): the second is refused in one line, naming the first.
    home = tmp_path / "home"
    worker = _start(home, "worker", "--interface", "127.0.0.1", stderr=tmp_path / "w.err")
    try:
        worker.wait_for(r"on port (\d+)", 60)
        refusal = (f"hearth: Hearth on this device ({home / 'data'}) is already in use by hearth worker "
                   f"(pid {worker.popen.pid}): quit it first (one app or worker per device), "
                   "or give this one its own HEARTH_HOME\n")
        second = _run(home, "worker", "--interface", "127.0.0.1")
        assert (second.returncode, second.stderr, second.stdout) == (2, refusal, "")
        app = _run(home)                      # the app is refused before it takes the terminal
        assert (app.returncode, app.stderr, app.stdout) == (2, refusal, "")
    finally:
        worker.stop(signal.SIGKILL)
    # The kernel drops the lock with its holder, however it died: nothing stale to clean up.
    again = _start(home, "worker", "--interface", "127.0.0.1", stderr=tmp_path / "again.err")
    try:
        again.wait_for(r"on port (\d+)", 60)
    finally:
        assert again.stop(signal.SIGTERM) == 0
