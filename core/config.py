"""Configuration: TOML, validated against the defaults shipped in `assets/default_config.toml`.

A user's config file holds only what they changed. Every key must exist in the defaults and have
the same type; a bad one is reported as `config.toml: <section.key> ...` and nothing runs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.errors import HearthError
from core.paths import hearth_paths

# Sections whose keys are free-form (values must still be strings).
_FREE_SECTIONS = {"keys"}
_KINDS = ("laptop", "desktop", "phone")


@dataclass
class Config:
    values: dict[str, dict[str, Any]]
    path: Path
    user_values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self.values[section][key]

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values.get(name, {}))


def default_values() -> dict[str, dict[str, Any]]:
    text = resources.files("assets").joinpath("default_config.toml").read_text("utf-8")
    return tomllib.loads(text)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def validate(user: dict[str, Any], defaults: dict[str, dict[str, Any]], where: str) -> None:
    """Raise HearthError naming the first bad key of `user`."""
    for section, body in user.items():
        if section not in defaults:
            raise HearthError(f"{where}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise HearthError(f"{where}: {section} must be a table ([{section}])")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if section in _FREE_SECTIONS:
                if not isinstance(value, str):
                    raise HearthError(f"{where}: {dotted} must be a string")
                continue
            if key not in defaults[section]:
                raise HearthError(f"{where}: unknown key {dotted}")
            default = defaults[section][key]
            if not _same_type(default, value):
                raise HearthError(f"{where}: {dotted} must be {_type_name(default)}, got {value!r}")
    _check_ranges(user, where)


def _check_ranges(user: dict[str, Any], where: str) -> None:
    chat = user.get("chat", {})
    for key, lo, hi in (("temperature", 0.0, 5.0), ("top_p", 0.0, 1.0), ("repeat_penalty", 0.5, 5.0)):
        if key in chat and not lo <= chat[key] <= hi:
            raise HearthError(f"{where}: chat.{key} must be between {lo} and {hi}, got {chat[key]}")
    for key in ("max_tokens", "context_length"):
        if key in chat and (not isinstance(chat[key], int) or chat[key] < 1):
            raise HearthError(f"{where}: chat.{key} must be a positive whole number")
    for dotted in ("serve.port", "mesh.port"):
        section, key = dotted.split(".")
        port = user.get(section, {}).get(key)
        if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
            raise HearthError(f"{where}: {dotted} must be a port number 0-65535")
    kind = user.get("mesh", {}).get("kind")
    if kind is not None and kind not in _KINDS:
        raise HearthError(f"{where}: mesh.kind must be one of {', '.join(_KINDS)}, got {kind!r}")


def load_config(path: Path | None = None) -> Config:
    path = path or hearth_paths().config_file
    defaults = default_values()
    user: dict[str, Any] = {}
    if path.exists():
        try:
            user = tomllib.loads(path.read_text("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise HearthError(f"{path}: not valid TOML ({exc})") from None
        except UnicodeDecodeError:
            raise HearthError(f"{path}: not UTF-8 text") from None
        validate(user, defaults, str(path))
    merged = {section: dict(body) for section, body in defaults.items()}
    for section, body in user.items():
        merged.setdefault(section, {}).update(body)
    return Config(merged, path, user)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def set_value(dotted: str, value: Any, path: Path | None = None) -> Config:
    """Change one key in the user's config file (validated, written atomically)."""
    config = load_config(path)
    section, key = dotted.split(".", 1)
    user = {s: dict(b) for s, b in config.user_values.items()}
    user.setdefault(section, {})[key] = value
    validate(user, default_values(), str(config.path))
    lines: list[str] = []
    for name, body in user.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")
    atomic_write_text(config.path, "\n".join(lines))
    return load_config(config.path)
