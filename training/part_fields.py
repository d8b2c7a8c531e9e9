"""What a device agent must know about training job parts before any is used, without torch.

The request types pooled (`pac.*`, training/worker_parts.py) and federated (`fed.*`,
training/fed_parts.py) jobs send, and the fields each must carry: the mesh checks them before a
handler runs. Kept apart from the parts themselves so that a device registers them at start
(the app does, on its mesh thread) and loads torch only when a paired device opens a job.
Also here: `LocalData`, a device's private data for federated jobs, checked when registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PAC_OPEN, PAC_PROFILE, PAC_SINK, PAC_SAMPLES = "pac.open", "pac.profile", "pac.sink", "pac.samples"
PAC_STEP, PAC_APPLY, PAC_STAGE, PAC_CLOSE = "pac.step", "pac.apply", "pac.stage", "pac.close"
PAC_CACHE_OUT, PAC_CACHE_IN, PAC_FILL = "pac.cache_out", "pac.cache_in", "pac.fill"
FED_INFO, FED_OPEN, FED_ROUND, FED_CLOSE = "fed.info", "fed.open", "fed.round", "fed.close"

PAC_FIELDS: dict[str, dict[str, type]] = {
    PAC_OPEN: {"job": str, "spec": str, "model_sha256": str, "model_name": str},
    PAC_PROFILE: {"job": str, "tokens": int},
    PAC_SINK: {},
    PAC_SAMPLES: {"job": str},
    PAC_STEP: {"job": str, "step": int},
    PAC_APPLY: {"job": str, "step": int},
    PAC_STAGE: {"job": str, "first": int, "last": int},
    PAC_CLOSE: {"job": str},
    PAC_CACHE_OUT: {"job": str, "indices": list},
    PAC_CACHE_IN: {"job": str},
    PAC_FILL: {"job": str, "indices": list},
}
FED_FIELDS: dict[str, dict[str, type]] = {
    FED_INFO: {},
    FED_OPEN: {"job": str, "spec": str, "files": list},
    FED_ROUND: {"job": str, "round": int, "rank": int, "steps": int},
    FED_CLOSE: {"job": str},
}


@dataclass
class LocalData:
    """Data registered on this device only (`hearth worker --data`, config mesh.private_data):
    paths and a count. Federated jobs train on it here; it is never sent."""

    paths: list[Path] = field(default_factory=list)
    conversations: int = 0


def local_data(paths: list[str | Path]) -> LocalData:
    """Validate every file now (a bad line: one-line HearthError naming file and line)."""
    from training.data import read_sources, source_path

    if not paths:
        return LocalData()
    return LocalData([source_path(p) for p in paths], len(read_sources(paths)))
