"""Capability profile: what a device can do, and how good the link to it is.

`measure_device()` runs on the device itself (cores, memory, a measured float32 matmul rate,
torch threads, accelerator, battery/AC where the OS tells). `LinkMeasurement` is measured by the
asking device over the real mesh connection (client.py): round-trip time from small echoes and
bandwidth from one payload of `link_bytes`. This module does not plan anything with the numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class DeviceProfile:
    cores: int
    memory_total_mb: int
    memory_free_mb: int
    matmul_gflops: float          # measured float32 matmul rate with torch's current threads
    torch_threads: int
    accelerator: str | None       # e.g. "cuda: NVIDIA ..." or "mps"; None on CPU-only devices
    battery_percent: float | None
    on_ac: bool | None

    def to_fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "DeviceProfile":
        def num(name: str, kind: type, optional: bool = False) -> Any:
            value = fields.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"profile field {name!r} must be a number")
            return kind(value)

        accel = fields.get("accelerator")
        on_ac = fields.get("on_ac")
        return cls(
            cores=num("cores", int), memory_total_mb=num("memory_total_mb", int),
            memory_free_mb=num("memory_free_mb", int), matmul_gflops=num("matmul_gflops", float),
            torch_threads=num("torch_threads", int),
            accelerator=str(accel)[:100] if isinstance(accel, str) else None,
            battery_percent=num("battery_percent", float, optional=True),
            on_ac=on_ac if isinstance(on_ac, bool) else None,
        )


@dataclass
class LinkMeasurement:
    rtt_ms: float                 # median round trip of small requests over the TLS connection
    bandwidth_mbps: float         # megabits per second of one payload to the device


@dataclass
class PeerProfile:
    device_id: str
    name: str
    device: DeviceProfile
    link: LinkMeasurement | None


def _memory_mb() -> tuple[int, int]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total >> 20, vm.available >> 20
    except ImportError:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0])
        return info["MemTotal"] >> 10, info.get("MemAvailable", info["MemFree"]) >> 10


def _battery() -> tuple[float | None, bool | None]:
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError):
        return None, None
    if battery is None:
        return None, None
    return float(battery.percent), battery.power_plugged


def _accelerator() -> str | None:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return None


def matmul_gflops(size: int = 384, seconds: float = 0.3) -> float:
    """Measured float32 matmul rate (GFLOP/s) of this process's torch threads."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm up
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return round(2 * size**3 * count / elapsed / 1e9, 2)


def measure_device() -> DeviceProfile:
    import torch

    total, free = _memory_mb()
    battery, on_ac = _battery()
    return DeviceProfile(
        cores=os.cpu_count() or 1,
        memory_total_mb=total,
        memory_free_mb=free,
        matmul_gflops=matmul_gflops(),
        torch_threads=torch.get_num_threads(),
        accelerator=_accelerator(),
        battery_percent=battery,
        on_ac=on_ac,
    )
