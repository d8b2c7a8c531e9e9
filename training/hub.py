"""Base models from a model hub, through `huggingface_hub`, into Hearth's cache dir.

Downloads show a progress bar and resume where a broken one stopped. `HF_ENDPOINT` points at a
mirror; `HF_HUB_OFFLINE=1` (or no network) gives a clear message instead of a hang.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import HearthError
from core.paths import hearth_paths

# What a transformers model needs; skips other formats a repository may carry (onnx, gguf, ...).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def local_snapshot(hub_id: str) -> Path | None:
    """The downloaded folder of `hub_id`, or None if it is not fully in the cache."""
    cache = hearth_paths().hub_cache_dir
    if not (cache / ("models--" + hub_id.replace("/", "--"))).is_dir():
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True,
                                        allow_patterns=MODEL_FILES))
    except Exception:
        return None
    return folder if (folder / "config.json").is_file() else None


def download(hub_id: str, progress: bool = True) -> Path:
    """Download `hub_id` (resuming a partial download) and return its local folder."""
    import huggingface_hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hearth_paths().hub_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    if not progress:
        huggingface_hub.utils.disable_progress_bars()
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, allow_patterns=MODEL_FILES))
    except GatedRepoError:
        raise HearthError(f"{hub_id}: gated on the hub; accept its license there and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HearthError(f"{hub_id}: no such model on the hub") from None
    except RevisionNotFoundError:
        raise HearthError(f"{hub_id}: no such revision on the hub") from None
    except LocalEntryNotFoundError:
        raise HearthError(
            f"{hub_id}: not downloaded yet and the hub cannot be reached (offline mode or no network)"
        ) from None
    except OSError as exc:
        raise HearthError(f"{hub_id}: download failed ({str(exc).splitlines()[0][:200]})") from None
    if not (folder / "config.json").is_file():
        raise HearthError(f"{hub_id}: the download has no config.json (not a transformers model)")
    return folder
