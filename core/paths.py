"""Where Hearth keeps its state.

platformdirs decides config, data and cache directories. `HEARTH_HOME` overrides all three at
once (tests and multi-device simulations on one machine use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "hearth"


@dataclass(frozen=True)
class HearthPaths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def identity_dir(self) -> Path:
        return self.data_dir / "identity"

    @property
    def trust_dir(self) -> Path:
        return self.data_dir / "trusted"

    @property
    def device_lock(self) -> Path:
        """Held by the one process that is this device on the mesh: the app or `hearth worker`."""
        return self.data_dir / "device.lock"

    @property
    def history_db(self) -> Path:
        return self.data_dir / "history.sqlite3"

    @property
    def models_dir(self) -> Path:
        """Personalised models: one folder each, with a `hearth-model.json` manifest."""
        return self.data_dir / "models"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def jobs_dir(self) -> Path:
        """Training jobs in progress: checkpoints and progress logs."""
        return self.data_dir / "jobs"

    def job_lock(self, name: str) -> Path:
        """Held while job `name` trains (beside its folder, which a fresh start deletes)."""
        return self.jobs_dir / f"{name}.lock"

    @property
    def teach_file(self) -> Path:
        """Corrections taught in chat, as training data (OpenAI `messages` JSONL)."""
        return self.data_dir / "taught.jsonl"

    @property
    def hub_cache_dir(self) -> Path:
        return self.cache_dir / "hub"

    @property
    def activation_cache_dir(self) -> Path:
        return self.cache_dir / "activations"


def hearth_paths() -> HearthPaths:
    """The directories for this process, honouring `HEARTH_HOME`."""
    home = os.environ.get("HEARTH_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        return HearthPaths(root / "config", root / "data", root / "cache")
    import platformdirs

    return HearthPaths(
        Path(platformdirs.user_config_dir(APP_NAME)),
        Path(platformdirs.user_data_dir(APP_NAME)),
        Path(platformdirs.user_cache_dir(APP_NAME)),
    )


def keep_private() -> None:
    """Everything Hearth writes is the family's: chats, taught answers, training data sent by a
    paired device, activation caches (hidden states of private text), models, keys. On a computer
    shared by several accounts it must not be readable by the others, whatever the umask, and
    wherever a library writes (SQLite, numpy, the hub client). So a `hearth` process creates
    files for its own account only (umask 077), and its three folders are made private on start
    (an install from before this rule had them readable by every account). Not done on import:
    tests call `main` in-process and keep their own umask."""
    os.umask(0o077)
    paths = hearth_paths()
    for folder in (paths.config_dir, paths.data_dir, paths.cache_dir):
        try:
            if folder.is_dir() and folder.stat().st_uid == os.getuid():
                folder.chmod(0o700)
        except OSError:
            pass   # not ours to change (a shared mount): the files in it are still private
