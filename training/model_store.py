"""The model store: one place that turns a model reference into a usable model.

A reference is, in the order tried:
- a catalog name (`smollm2-135m`, the bundled default; others come from the hub);
- the name of a personalised model (a folder in the data dir with a `hearth-model.json`);
- a local `.gguf` file, or a local Hugging Face directory (config + safetensors + tokenizer);
- a hub id (`HuggingFaceTB/SmolLM2-360M-Instruct`), downloaded into the cache dir.

llama.cpp takes GGUF files as they are; torch gets a transformers model (GGUF weights dequantised
to float32).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.errors import HearthError
from core.paths import hearth_paths
from training.catalog import CatalogEntry, find_entry

MANIFEST = "hearth-model.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PersonalModel:
    """What `hearth-model.json` says about a model Hearth made."""

    name: str
    base: str                 # the reference it was trained from
    method: str               # "pac", "lora", "pruned", "federated", ...
    format: str               # "hf" (merged weights), "peft" (adapter on base), "pac" (side chain on base), "gguf"
    created: str = ""
    pruning_ratio: float = 0.0
    parameters: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @property
    def needs_base(self) -> bool:
        """Adapters (pac, peft) run on their base's weights; merged weights and GGUF files do not."""
        return self.format in ("pac", "peft")


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: what it is and where its files are."""

    text: str                             # what the user named
    kind: str                             # "gguf", "hf_dir", "hub", "personal"
    path: Path | None = None              # the .gguf file or the folder; None for a hub id not yet downloaded
    hub_id: str | None = None
    catalog: CatalogEntry | None = None
    personal: PersonalModel | None = None

    @property
    def display_name(self) -> str:
        if self.catalog:
            return self.catalog.name
        if self.personal:
            return self.personal.name
        return self.text


def read_manifest(folder: Path) -> PersonalModel:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text("utf-8"))
        return PersonalModel(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise HearthError(f"{path}: unreadable model manifest ({exc})") from None


def personal_models() -> list[PersonalModel]:
    root = hearth_paths().models_dir
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if (folder / MANIFEST).is_file() and not folder.name.startswith("."):
            found.append(read_manifest(folder))
    return found


@dataclass
class ModelListing:
    """One model as the lists show it (`hearth models list`, the Models screen): a catalog entry
    or a personalised model, with what only this device knows about it. Each list formats it."""

    available: bool                        # runs here: downloaded, or a personal model's base is here
    path: Path | None = None               # catalog: the GGUF or folder here; personal: its folder
    catalog: CatalogEntry | None = None
    personal: PersonalModel | None = None
    problem: str = ""                      # why a personal model cannot run (its base has gone)
    base_of: list[str] = field(default_factory=list)   # the models that run on it

    @property
    def has_gguf(self) -> bool:
        if self.path is None:
            return False
        return self.path.suffix == ".gguf" if self.catalog is not None else newest_gguf(self.path) is not None


def list_models() -> list[ModelListing]:
    """The catalog's models, then the personalised ones (every manifest read once)."""
    from training.catalog import load_catalog
    from training.hub import local_snapshot

    found = []
    for entry in load_catalog():
        local = entry.bundled_path() or local_snapshot(entry.hub_id)
        found.append(ModelListing(local is not None, local, catalog=entry))
    mine = personal_models()
    for model in mine:
        problem = missing_base(model)
        found.append(ModelListing(not problem, hearth_paths().models_dir / model.name, personal=model,
                                  problem=problem, base_of=dependents(model.name, mine)))
    return found


def dependents(name: str, among: list[PersonalModel] | None = None) -> list[str]:
    """The personalised models whose adapters run on model `name` (a pruned model can be trained
    on): deleting or replacing `name` would leave them on missing or other weights. `among`: the
    manifests already read, else all of them are."""
    return [m.name for m in (personal_models() if among is None else among) if m.needs_base and m.base == name]


def first_weights(ref: ModelRef) -> ModelRef | None:
    """The model whose weights a personalised model started from: its bases followed (trained on
    pruned on a catalog model) to the first that is not personalised; None when one has gone."""
    for _ in range(8):
        if ref.personal is None:
            return ref
        if not ref.personal.base:
            return None
        try:
            ref = resolve(ref.personal.base)
        except HearthError:
            return None
    return None


def check_model_name(name: str, field: str = "--out") -> None:
    """A name for a new personalised model, checked before any work: `resolve` must find it later
    (a catalog model's name would hide it for ever) and it must be a plain folder name."""
    if not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
        raise HearthError(f"{field} {name!r}: a model name may hold letters, digits, '.', '_' and '-' only")
    if find_entry(name) is not None:
        raise HearthError(f"{field} {name!r} is a catalog model's name: choose another")


def resolve_base(model: PersonalModel) -> ModelRef:
    """The base model `model`'s adapters run on, or a one-line error naming both when it has gone
    (a folder moved or deleted, a package uninstalled): "unknown model '/some/folder'" alone did
    not say which model needed it."""
    try:
        return resolve(model.base)
    except HearthError:
        raise HearthError(f"model {model.name} runs on its base model {model.base}, which is not here any "
                          f"more: put it back, or train {model.name} again from a base that is") from None


def missing_base(model: PersonalModel) -> str:
    """Why `model` cannot run here (its base has gone), or "" when it can. A GGUF exported beside
    it runs without the base."""
    if not model.needs_base or any((hearth_paths().models_dir / model.name).glob("*.gguf")):
        return ""
    try:
        resolve_base(model)
    except HearthError as exc:
        return str(exc)
    return ""


def resolve(text: str) -> ModelRef:
    """Turn what a user typed into a ModelRef, or raise a one-line HearthError."""
    text = text.strip()
    if not text:
        raise HearthError("no model named")
    entry = find_entry(text)
    if entry is not None:
        bundled = entry.bundled_path()
        if bundled is not None:
            return ModelRef(text, "gguf", bundled, entry.hub_id, entry)
        if entry.bundled:
            package = entry.bundled.split("/")[0]
            hint = f"its package '{package}' is not installed (run the README's set-up)"
        else:
            hint = None
        downloaded = _downloaded_hub_dir(entry.hub_id)
        if downloaded is not None:
            return ModelRef(text, "hf_dir", downloaded, entry.hub_id, entry)
        if hint:
            raise HearthError(f"model {entry.name}: {hint}")
        return ModelRef(text, "hub", None, entry.hub_id, entry)
    personal_dir = hearth_paths().models_dir / text
    if re.fullmatch(r"[\w.-]+", text) and (personal_dir / MANIFEST).is_file():
        return ModelRef(text, "personal", personal_dir, personal=read_manifest(personal_dir))
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise HearthError(f"{path}: no such file")
        check_gguf(path)
        return ModelRef(text, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HearthError(f"{path}: not a model folder (no config.json)")
        return ModelRef(text, "hf_dir", path.resolve())
    if path.exists():
        raise HearthError(f"{path}: not a .gguf file or a model folder")
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        downloaded = _downloaded_hub_dir(text)
        if downloaded is not None:
            return ModelRef(text, "hf_dir", downloaded, text)
        return ModelRef(text, "hub", None, text)
    raise HearthError(
        f"unknown model '{text}': not a catalog name, a personalised model, a file or a hub id "
        "(see `hearth models list`)"
    )


def _downloaded_hub_dir(hub_id: str) -> Path | None:
    from training.hub import local_snapshot

    return local_snapshot(hub_id)


def check_gguf(path: Path) -> None:
    """Raise a one-line HearthError if `path` is not a complete, readable GGUF file.

    Walks the header (metadata and tensor list) without loading any weights, so a file cut short
    by a broken copy or download is reported as truncated, with the size it should have.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as exc:
        raise HearthError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if len(data) < 8 or data[:4] != b"GGUF":
            raise HearthError(f"{path}: not a GGUF file (bad magic bytes)")
        version = struct.unpack_from("<I", data, 4)[0]
        if version not in (2, 3):
            raise HearthError(f"{path}: unsupported GGUF version {version}")
        try:
            needed = _GGUFWalker(data).expected_size()
        except _Truncated as exc:
            raise HearthError(f"{path}: truncated GGUF (the file ends inside the {exc}, at {size} bytes)") from None
        except _Corrupt as exc:
            raise HearthError(f"{path}: corrupt GGUF ({exc})") from None
        if needed > size:
            raise HearthError(f"{path}: truncated GGUF (needs {needed} bytes, the file has {size})")
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


# Sizes of GGUF's fixed-size metadata value types (the format's type ids).
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# A count or length beyond this is garbage, not a big model; smaller ones that run past the end of
# the file are reported as truncation.
_IMPLAUSIBLE = 1 << 34


class _GGUFWalker:
    """Reads just enough of a GGUF header to know how long the file must be."""

    def __init__(self, data):
        self.data = data
        self.pos = 8

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated(what)
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        if n > _IMPLAUSIBLE:
            raise _Corrupt(f"a string in the {what} claims {n} bytes")
        start = self.take(n, what)
        return bytes(self.data[start:start + n])

    def value(self, kind: int, what: str) -> None:
        if kind in _GGUF_SCALARS:
            self.take(_GGUF_SCALARS[kind], what)
        elif kind == _GGUF_STRING:
            self.string(what)
        elif kind == _GGUF_ARRAY:
            item, count = self.u32(what), self.u64(what)
            if count > _IMPLAUSIBLE:
                raise _Corrupt(f"{what} claims {count} items")
            if item in _GGUF_SCALARS:
                self.take(_GGUF_SCALARS[item] * count, what)
            else:
                for _ in range(count):
                    self.value(item, what)
        else:
            raise _Corrupt(f"unknown value type {kind} in {what}")

    def expected_size(self) -> int:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        n_tensors, n_kv = self.u64("header"), self.u64("header")
        if n_tensors > _IMPLAUSIBLE or n_kv > _IMPLAUSIBLE:
            raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        alignment = 32
        for _ in range(n_kv):
            key = self.string("metadata keys")
            kind = self.u32("metadata keys")
            start = self.pos
            self.value(kind, f"metadata value {key.decode('utf-8', 'replace')[:60]}")
            if key == b"general.alignment" and kind == 4:
                alignment = struct.unpack_from("<I", self.data, start)[0] or 32
        end = 0
        for _ in range(n_tensors):
            name = self.string("tensor list").decode("utf-8", "replace")[:80]
            dims = [self.u64("tensor list") for _ in range(min(self.u32("tensor list"), 8))]
            kind, offset = self.u32("tensor list"), self.u64("tensor list")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name} has unknown type {kind}") from None
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * block_bytes)
        data_start = -(-self.pos // alignment) * alignment
        return data_start + end


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def ensure_local(ref: ModelRef, progress: bool = True) -> ModelRef:
    """Download a hub reference (with a progress bar); other references are returned as they are."""
    if ref.kind != "hub":
        return ref
    from training.hub import download

    folder = download(ref.hub_id or ref.text, progress=progress)
    return ModelRef(ref.text, "hf_dir", folder, ref.hub_id, ref.catalog)


def newest_gguf(folder: Path) -> Path | None:
    """The GGUF a personalised model runs as: the last one exported into its folder. (The first
    by name ran: an f16 export hid a q8_0 exported after it, at half the speed.)"""
    ggufs = list(folder.glob("*.gguf"))
    return max(ggufs, key=lambda p: (p.stat().st_mtime_ns, p.name)) if ggufs else None


def model_stamp(name: str) -> str:
    """What changes when personalised model `name` changes on disk: a retrain renames a new
    folder into its place, an export adds the GGUF it then runs as. A chat that loaded it
    before loads it again (it answered with the old model until the app restarted). "" for a
    model that is not a personalised one."""
    folder = hearth_paths().models_dir / name
    try:
        manifest = (folder / MANIFEST).stat()
    except (OSError, ValueError):
        return ""
    newest = newest_gguf(folder)
    return f"{manifest.st_ino}:{manifest.st_mtime_ns}:{newest.name if newest else ''}"


def gguf_path(ref: ModelRef) -> Path:
    """The GGUF file llama.cpp should load for this reference."""
    if ref.kind == "gguf" and ref.path is not None:
        return ref.path
    if ref.kind == "personal" and ref.path is not None:
        newest = newest_gguf(ref.path)
        if newest is not None:
            return newest
        raise HearthError(
            f"model {ref.display_name} has no GGUF file: export it with `hearth export "
            f"{ref.display_name} --gguf`, or chat with it through the torch engine"
        )
    raise HearthError(
        f"model {ref.display_name} is not a GGUF file: export it first (`hearth export`) "
        "or chat with it through the torch engine"
    )


def quiet_transformers() -> None:
    """No progress bars from transformers ("Loading weights", "Writing model shards"): drawn on
    stderr at every load and save, they landed between a command's own lines and under the app.
    Hearth reports its own progress; downloads keep theirs (huggingface_hub's own bars)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))


def load_torch(ref: ModelRef, dtype: str = "float32", on_layer: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """A transformers causal LM (eval mode; which weights train is the trainer's choice) and its
    tokenizer for this reference. `on_layer` is called on each decoder layer as soon as its
    weights are in, where the loader fills the model layer by layer (plain Llama GGUFs); other
    loaders hand over the whole model and do not call it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    ref = ensure_local(ref)
    torch_dtype = getattr(torch, dtype)
    if ref.kind == "personal" and ref.path is not None and not (ref.path / "config.json").is_file():
        newest = newest_gguf(ref.path)
        if newest is None:
            form = ref.personal.format if ref.personal else "?"
            raise HearthError(
                f"model {ref.display_name} holds '{form}' adapters, not plain weights: load it with "
                "training.merge (LoRA) or the torch engine (parallel adapters)"
            )
        ref = ModelRef(ref.text, "gguf", newest, personal=ref.personal)
    if ref.kind == "gguf":
        assert ref.path is not None
        check_gguf(ref.path)
        from training.gguf_model import load_gguf_model

        model, tokenizer = load_gguf_model(ref.path, torch_dtype, on_layer)
    elif ref.kind in ("hf_dir", "personal"):
        assert ref.path is not None
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref.path)
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise HearthError(f"{ref.path}: cannot load model ({_short(exc)})") from None
    else:
        raise HearthError(f"cannot load {ref.text} ({ref.kind})")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
