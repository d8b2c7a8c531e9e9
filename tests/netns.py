"""Test hosts in network namespaces: a reusable lab for mesh, pooled and federated tests.

    with NetnsLab() as lab:                       # needs root and `ip netns`; see lab_unavailable()
        a = lab.add_host("a")                     # namespace + veth on the lab's bridge, 10.77.0.1/24
        b = lab.add_host("b", rate="100mbit")     # tbf shaping of what b sends; b.shape(None) lifts it
        worker = a.hearth("worker", "--name", "a", "--port", "7000")   # a HostProcess, own HEARTH_HOME
        worker.wait_for(r"Device id: (\\S+)")
        result = b.call(some_function, arg)       # runs in a spawned child inside b's namespace
        with lab.capture(a) as cap: ...           # raw-socket packet capture of a's link
        cap.data                                  # every captured frame, concatenated bytes

Layout: a hub namespace holds a bridge (multicast snooping off, so mDNS floods); each host is
its own namespace whose `eth0` is a veth into that bridge, with an address in 10.77.0.0/24 and a
224.0.0.0/4 route for mDNS. Nothing is added to the machine's own namespace. Names carry the
pid, so parallel runs do not clash. Everything is torn down on close (also after a failure): the
processes the lab started are killed, then the namespaces are deleted (which deletes the veths).
Addresses are only ever those of these test hosts.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003


def lab_unavailable() -> str | None:
    """Why a lab cannot be built here (None when it can): for pytest.skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"hearthprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def enter_netns(ns: str) -> None:
    """Move the calling thread (or a fresh child process) into namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


class HostProcess:
    """A process in a host's namespace: stdout lines are collected, stdin takes answers."""

    def __init__(self, popen: subprocess.Popen, stderr_path: Path):
        self.popen = popen
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match:
        """The first stdout line (from index `after`) matching `pattern`; AssertionError on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._more_coming()):
                    raise AssertionError(f"no line matching {pattern!r} in {timeout} s; stdout:\n"
                                         + "\n".join(self.lines) + "\nstderr:\n" + self.stderr())
                self._cond.wait(min(left, 0.2))

    def _more_coming(self) -> bool:
        return self.popen.stdout is not None and not self.popen.stdout.closed and self.popen.poll() is None

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = 15, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Host:
    """One test host: a namespace with one address on the lab's bridge and its own HEARTH_HOME."""

    def __init__(self, lab: "NetnsLab", name: str, ns: str, address: str, bridge_port: str):
        self.lab, self.name, self.ns, self.address, self.bridge_port = lab, name, ns, address, bridge_port
        self.home = lab.root / name
        self.home.mkdir(parents=True, exist_ok=True)

    def shape(self, rate: str | None) -> None:
        """Limit what this host sends to `rate` (e.g. "40mbit") with tbf; None removes the limit."""
        if rate is None:
            subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)
            return
        subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                        "rate", rate, "burst", "64kbit", "latency", "400ms"], check=True, capture_output=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HEARTH_HOME=str(self.home), PYTHONUNBUFFERED="1", **extra)
        return env

    def popen(self, argv: list[str], stdin_text: bool = True, **extra_env: str) -> HostProcess:
        """Start `argv` inside this namespace (via `ip netns exec`); tracked for teardown."""
        stderr_path = self.lab.root / f"{self.name}-{len(self.lab.processes)}.stderr"
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *argv], cwd=REPO, env=self.env(**extra_env), text=True,
            stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=open(stderr_path, "w"), bufsize=1,
        )
        process = HostProcess(popen, stderr_path)
        self.lab.processes.append(process)
        return process

    def hearth(self, *args: str, **extra_env: str) -> HostProcess:
        """Run the `hearth` command in this host, with this host's HEARTH_HOME."""
        return self.popen([str(VENV_BIN / "hearth"), *args], **extra_env)

    def pair_with(self, worker: HostProcess, worker_name: str) -> None:
        """Pair this host with a `hearth worker` (named `worker_name`) running in another host:
        `hearth pair` here, and "y" typed on both sides once the worker prompts."""
        mark = len(worker.lines)
        pair = self.hearth("pair", worker_name, "--interface", self.address)
        pair.send_line("y")
        worker.wait_for(r"Accept\? \[y/N\]", 30, mark)
        worker.send_line("y")
        assert pair.wait(60) == 0, pair.stderr() + "\n".join(pair.lines)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> "HostCall":
        """Run `fn(*args)` in a fresh child process inside this namespace (HEARTH_HOME = this host's).

        The child is spawned, not forked: a fork of a test process whose torch already ran a
        parallel region inherits a dead OpenMP thread pool and hangs in its first matmul."""
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        process = ctx.Process(target=_child, args=(self.ns, str(self.home), fn, args, results), daemon=True)
        process.start()
        call = HostCall(process, results)
        self.lab.calls.append(call)
        return call

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """`fn(*args)` inside this namespace; its return value (picklable), or its error re-raised."""
        return self.spawn(fn, *args).result(timeout)


class HostCall:
    def __init__(self, process, results):
        self.process, self.results = process, results

    def result(self, timeout: float = 60.0) -> Any:
        try:
            status, value = self.results.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"call in namespace did not finish in {timeout} s") from None
        self.process.join(5)
        if status == "error":
            raise AssertionError(f"call in namespace failed:\n{value}")
        return value


def _child(ns: str, home: str, fn: Callable[..., Any], args: tuple, results) -> None:
    try:
        enter_netns(ns)
        os.environ["HEARTH_HOME"] = home
        results.put(("ok", fn(*args)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


class Capture:
    """Raw-socket capture (AF_PACKET, every protocol) of one bridge port, in the hub namespace."""

    def __init__(self, ns: str, interface: str):
        self.ns, self.interface = ns, interface
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            enter_netns(self.ns)  # this thread only; the socket stays bound to that namespace
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((self.interface, 0))
            sock.settimeout(0.2)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        with sock:
            while not self._stop.is_set():
                try:
                    self.frames.append(sock.recv(65535))
                except socket.timeout:
                    continue

    def __enter__(self) -> "Capture":
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # let the last packets arrive
        self._stop.set()
        self._thread.join(5)

    @property
    def data(self) -> bytes:
        return b"".join(self.frames)


class NetnsLab:
    """Namespaces joined by one bridge. Use as a context manager; see the module docstring."""

    def __init__(self, tag: str = "hl"):
        self.prefix = f"{tag}{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.hosts: list[Host] = []
        self.processes: list[HostProcess] = []
        self.calls: list[HostCall] = []
        self._namespaces: list[str] = []

    def __enter__(self) -> "NetnsLab":
        try:
            self._add_ns(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a crashed run
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, rate: str | None = None) -> Host:
        """A new host `name` with the next address of 10.77.0.0/24; `rate` shapes its link (tbf)."""
        index = len(self.hosts) + 1
        ns, port, address = f"{self.prefix}-{name}", f"p{index}", f"{SUBNET}.{index}"
        self._add_ns(ns)
        _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        host = Host(self, name, ns, address, port)
        if rate:
            host.shape(rate)
        self.hosts.append(host)
        return host

    def capture(self, host: Host) -> Capture:
        """Capture everything on `host`'s link (its bridge port, seen from the hub)."""
        return Capture(self.hub, host.bridge_port)

    def close(self) -> None:
        for process in self.processes:
            try:
                process.stop(sig=9, timeout=5)
            except Exception:
                pass
        for call in self.calls:
            if call.process.is_alive():
                call.process.kill()
                call.process.join(5)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        shutil.rmtree(self.root, ignore_errors=True)
