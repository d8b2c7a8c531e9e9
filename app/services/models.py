"""The models the app lists: catalog base models and personalised ones, and what can be done to them.

`ModelsService` reads the catalog and the model store, sets the active chat model in the config,
deletes a personalised model's folder and exports one to GGUF (training/export_gguf.py). It
blocks (an export takes minutes): the app calls it from worker threads. No UI code here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, load_config, set_value
from core.errors import HearthError
from core.paths import hearth_paths


@dataclass
class ModelInfo:
    name: str
    kind: str                 # "base" or "personal"
    title: str                # one line: what it is, or how it was trained
    parameters: str           # "135M", "?"
    size_mb: float            # on disk (0: not here)
    pruning: float            # fraction of the base removed (0: not pruned)
    trained: str              # method and base ("pac on smollm2-135m"), "" for base models
    available: bool           # can chat or train without a download
    active: bool              # the model chat uses by default
    has_gguf: bool            # llama.cpp can run it


class ModelsService:
    def __init__(self, config: Config):
        self._config = config

    @property
    def active_model(self) -> str:
        return str(self._config.get("chat.model"))

    def models(self) -> list[ModelInfo]:
        from training.catalog import load_catalog
        from training.hub import local_snapshot
        from training.model_store import personal_models

        active = self.active_model
        found: list[ModelInfo] = []
        for entry in load_catalog():
            bundled = entry.bundled_path()
            local = bundled or local_snapshot(entry.hub_id)
            found.append(ModelInfo(
                name=entry.name, kind="base", title=entry.title, parameters=entry.parameters,
                size_mb=float(entry.size_mb), pruning=0.0, trained="", available=local is not None,
                active=entry.name == active, has_gguf=bundled is not None,
            ))
        root = hearth_paths().models_dir
        for model in personal_models():
            folder = root / model.name
            trained = f"{model.method} on {model.base}"
            found.append(ModelInfo(
                name=model.name, kind="personal", title=trained,
                parameters=_millions(model.parameters), size_mb=_folder_mb(folder),
                pruning=float(model.pruning_ratio), trained=trained, available=True,
                active=model.name == active, has_gguf=any(folder.glob("*.gguf")),
            ))
        return found

    def personal_count(self) -> int:
        return sum(1 for model in self.models() if model.kind == "personal")

    def set_active(self, name: str) -> None:
        """Make `name` the model chat uses (written to the user's config)."""
        from training.model_store import resolve

        resolve(name)  # a one-line HearthError for a name that is not a model
        self._config = set_value("chat.model", name, self._config.path)

    def delete(self, name: str) -> None:
        """Delete a personalised model's folder. Base models are never deleted."""
        from training.catalog import find_entry

        if find_entry(name) is not None:
            raise HearthError(f"model {name} is a base model of the catalog: it cannot be deleted")
        folder = hearth_paths().models_dir / name
        if not folder.is_dir() or not name or "/" in name or name.startswith("."):
            raise HearthError(f"{folder}: no personalised model called {name}")
        if name == self.active_model:
            raise HearthError(f"model {name} is the active chat model: make another one active first")
        # Rename first: a crash half-way through leaves a hidden folder, never a half model.
        doomed = folder.with_name(f".{name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def export_gguf(self, name: str, quant: str = "q8_0") -> Path:
        from training.export_gguf import export_model

        return export_model(name, quant).path

    def reload(self) -> None:
        self._config = load_config(self._config.path)


def _millions(count: int) -> str:
    if not count:
        return "?"
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
