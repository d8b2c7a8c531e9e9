"""Base models from a model hub, through `huggingface_hub`, into Hearth's cache dir.

Downloads show a progress bar. A connection that breaks in the middle of a file is resumed where
it stopped (an HTTP Range request); after an interrupted run, the files already complete are kept
and the next run fetches only the rest. `HF_ENDPOINT` points at a mirror; `HF_HUB_OFFLINE=1` (or
no network) gives a one-line message instead of a hang.

huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is first imported: set them in
the environment before the process starts.

This module does not load models (`training.model_store` does).
"""

from __future__ import annotations

from pathlib import Path

from core.errors import HearthError
from core.paths import hearth_paths

# What a transformers model needs; skips other formats a repository may carry (onnx, gguf, ...).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def repo_cache_dir(hub_id: str) -> Path:
    """Where huggingface_hub keeps `hub_id` in Hearth's cache (its blobs/ hold the bytes)."""
    return hearth_paths().hub_cache_dir / ("models--" + hub_id.replace("/", "--"))


def local_snapshot(hub_id: str) -> Path | None:
    """The downloaded folder of `hub_id`, or None if it is not fully in the cache. Never networks."""
    cache = hearth_paths().hub_cache_dir
    if not repo_cache_dir(hub_id).is_dir():
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True,
                                        allow_patterns=MODEL_FILES))
    except Exception:  # not cached, incomplete, or an unreadable cache: all mean "not here"
        return None
    return folder if (folder / "config.json").is_file() else None


def partial_files(hub_id: str) -> set[Path]:
    """The files of `hub_id` being downloaded (or left behind by a download that was killed)."""
    blobs = repo_cache_dir(hub_id) / "blobs"
    return set(blobs.glob("*.incomplete")) if blobs.is_dir() else set()


def download(hub_id: str, progress: bool = True) -> Path:
    """Download `hub_id` (resuming a partial download) and return its local folder."""
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hearth_paths().hub_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    if progress:
        # huggingface_hub hides its byte counters when stderr is not a terminal; a plain tqdm
        # shows them anyway, so a download started from a script or the app's log shows progress.
        from tqdm.auto import tqdm as progress_bar
    else:
        huggingface_hub.utils.disable_progress_bars()
        progress_bar = None
    where = constants.ENDPOINT
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, allow_patterns=MODEL_FILES,
                                        tqdm_class=progress_bar))
    except GatedRepoError:
        raise HearthError(f"{hub_id}: gated on the hub; accept its license there and log in (HF_TOKEN)") from None
    except DisabledRepoError:
        raise HearthError(f"{hub_id}: disabled on the hub {where}") from None
    except RepositoryNotFoundError:
        raise HearthError(f"{hub_id}: no such model on the hub {where}") from None
    except RevisionNotFoundError:
        raise HearthError(f"{hub_id}: no such revision on the hub {where}") from None
    except IncompleteSnapshotError:
        raise HearthError(
            f"{hub_id}: the download in the cache is incomplete and the hub {where} cannot be reached "
            "to finish it"
        ) from None
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise HearthError(
                f"{hub_id}: not downloaded yet and offline mode is on (HF_HUB_OFFLINE=1); "
                "unset it to download, or use a local model"
            ) from None
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "no answer"
        raise HearthError(
            f"{hub_id}: not downloaded yet and the hub {where} cannot be reached ({cause})"
        ) from None
    except OSError as exc:
        raise HearthError(f"{hub_id}: download failed ({_first_line(exc)})") from None
    if not (folder / "config.json").is_file():
        raise HearthError(f"{hub_id}: the download has no config.json (not a transformers model)")
    return folder


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
