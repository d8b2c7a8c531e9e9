"""The models the app lists: catalog base models and personalised ones, and what can be done to them.

`ModelsService` reads the catalog and the model store, downloads a catalog model, sets the active
chat model in the config, deletes a personalised model's folder and exports one to GGUF
(training/export_gguf.py). It blocks (a download or an export takes minutes): the app calls it
from worker threads. No UI code here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
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
    mergeable: bool = False   # a personalised model whose adapters merge into a GGUF (not pac's side chain)
    problem: str = ""         # a personalised model that cannot run: why (its base model has gone)


class ModelsService:
    def __init__(self, config: Config, on_active: Callable[[str], None] | None = None):
        """`on_active(name)` is told when the active model changes (the chat service's default)."""
        self._config = config
        self._on_active = on_active
        self._downloads: list[tuple[str, subprocess.Popen]] = []   # (model, its `hearth models pull`)
        self._downloads_lock = threading.Lock()

    @property
    def active_model(self) -> str:
        return str(self._config.get("chat.model"))

    def models(self) -> list[ModelInfo]:
        from training.model_store import list_models

        active = self.active_model
        found: list[ModelInfo] = []
        for m in list_models():
            if m.catalog is not None:
                entry = m.catalog
                found.append(ModelInfo(
                    name=entry.name, kind="base", title=entry.title, parameters=entry.parameters,
                    size_mb=float(entry.size_mb), pruning=0.0, trained="", available=m.available,
                    active=entry.name == active, has_gguf=m.has_gguf,
                ))
            else:
                model = m.personal
                assert model is not None and m.path is not None
                trained = f"{model.method} on {model.base}"
                found.append(ModelInfo(
                    name=model.name, kind="personal", title=_pruned_note(trained, model, m.base_of),
                    parameters=_millions(model.parameters), size_mb=_folder_mb(m.path),
                    pruning=float(model.pruning_ratio), trained=trained, available=m.available, problem=m.problem,
                    active=model.name == active, has_gguf=m.has_gguf, mergeable=model.format != "pac",
                ))
        return found

    def personal_count(self) -> int:
        """How many personalised models there are (the first-run check): the manifests alone,
        not the whole listing, which resolves every model's base."""
        from training.model_store import personal_models

        return len(personal_models())

    def set_active(self, name: str) -> None:
        """Make `name` the model chat uses (written to the user's config)."""
        require_here(name)   # and a one-line HearthError for a name that is not a model
        self._config = set_value("chat.model", name, self._config.path)
        if self._on_active is not None:
            self._on_active(name)

    def download(self, name: str, on_progress: Callable[[float, float], None],
                 cancel: threading.Event | None = None) -> None:
        """Download catalog model `name` (minutes), calling `on_progress(MB here, MB in all)`
        twice a second. It runs `hearth models pull` as a child process, which cancelling (or
        closing the app) interrupts at once; a thread could not be stopped, and would hold the
        app open. Files finished before the stop are kept; the child deletes the one it was
        writing as it stops (app/commands/models.fetch), so the next download starts that one again."""
        from training.catalog import find_entry
        from training.hub import repo_cache_dir

        entry = find_entry(name)
        if entry is None or entry.bundled_path() is not None:
            raise HearthError(f"model {name}: not a catalog model to download")
        cancel = cancel or threading.Event()
        blobs = repo_cache_dir(entry.hub_id) / "blobs"
        with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
            process = subprocess.Popen([sys.executable, "-m", "app", "models", "pull", entry.hub_id],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            with self._downloads_lock:
                self._downloads.append((name, process))
            try:
                while process.poll() is None:
                    on_progress(_folder_mb(blobs), float(entry.size_mb))
                    if cancel.wait(0.5):
                        raise HearthError(f"download of {name} stopped (files already complete are kept)")
            finally:
                with self._downloads_lock:
                    self._downloads.remove((name, process))
                _interrupt(process)
            if process.returncode != 0:
                errors.seek(0)
                said = [line for line in errors.read().splitlines() if line.startswith("hearth: ")]
                reason = said[-1].removeprefix("hearth: ") if said else f"exit status {process.returncode}"
                raise HearthError(f"download of {name} failed: {reason}")

    def downloading(self) -> list[str]:
        """The models being downloaded now (quitting asks first)."""
        with self._downloads_lock:
            return [name for name, _ in self._downloads]

    def close(self) -> None:
        """Stop the downloads in progress."""
        with self._downloads_lock:
            for _, process in self._downloads:
                process.terminate()

    def delete(self, name: str) -> None:
        """Delete a personalised model's folder. Base models are never deleted."""
        from training.catalog import find_entry
        from training.model_store import dependents

        if find_entry(name) is not None:
            raise HearthError(f"model {name} is a base model of the catalog: it cannot be deleted")
        folder = hearth_paths().models_dir / name
        if not folder.is_dir() or not name or "/" in name or name.startswith("."):
            raise HearthError(f"{folder}: no personalised model called {name}")
        if name == self.active_model:
            raise HearthError(f"model {name} is the active chat model: make another one active first")
        users = dependents(name)
        if users:
            raise HearthError(f"model {name} is the base of {', '.join(users)}, which run on it: delete "
                              f"{'them' if len(users) > 1 else 'it'} first")
        # Rename first: a crash half-way through leaves a hidden folder, never a half model.
        doomed = folder.with_name(f".{name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def export_gguf(self, name: str) -> Path:
        from training.export_gguf import export_model

        return export_model(name).path

    def reload(self) -> None:
        self._config = load_config(self._config.path)


def _pruned_note(title: str, model, users: list[str]) -> str:
    """A pruned model's line says why it is there: the models that run on it, or that it needs
    training (a pruned model alone answers poorly: docs/serving.md)."""
    if users:
        return f"{title}; {', '.join(users)} {'runs' if len(users) == 1 else 'run'} on it"
    if model.method == "pruned":
        return f"{title}; answers poorly until trained (hearth train --model {model.name})"
    return title


def _millions(count: int) -> str:
    if not count:
        return "?"
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def require_here(model: str) -> None:
    """The app never downloads behind its screen (gigabytes unasked, a progress bar over the
    app): a base model that is not on this device yet is refused with where to get it."""
    from training.model_store import resolve

    if resolve(model).kind == "hub":
        raise HearthError(f"model {model} is not on this device yet: download it on the Models screen (F4)")


def _interrupt(process: subprocess.Popen) -> None:
    """End a `hearth models pull`: on SIGTERM it deletes its partial file and leaves at once
    (app/commands/models.py, `fetch`); SIGKILL if it has not gone in 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _folder_mb(folder: Path) -> float:
    """MB of the files under `folder` (0 if it is not there). A file may vanish while this counts
    (a download renames its partial file when it completes): it is skipped, not an error."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total / 1e6
