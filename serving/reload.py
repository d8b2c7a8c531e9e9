"""A chat engine that follows its model on disk.

A retrain renames a new folder into the model's place and an export adds the GGUF the model then
runs as; a chat that kept the engine it started with answered with the old weights until it was
restarted. `hearth serve`, `hearth chat` and the app's chat each hold a `Reload` for the model
they answer with and ask it for the engine before every reply.
"""

from __future__ import annotations

from collections.abc import Callable

from training.engines import ChatEngine
from training.model_store import model_stamp


class Reload:
    """Opens `model` and, before each reply, opens it again if it changed on disk since.

    `open_engine` opens the model as it is now; `note(message, loaded)` tells the person what
    happened (`loaded` False: the changed model did not load and the one before still answers)."""

    def __init__(self, model: str, open_engine: Callable[[], ChatEngine],
                 note: Callable[[str, bool], None] = lambda message, loaded: None) -> None:
        self.model = model
        self._open, self._note = open_engine, note
        self._loaded = ""   # model_store.model_stamp when the engine in use was opened

    def open(self) -> ChatEngine:
        """The model's engine as it is on disk now."""
        self._loaded = model_stamp(self.model)   # before loading: a change made while it loads is seen
        return self._open()

    def fresh(self, engine: ChatEngine) -> ChatEngine:
        """`engine`, or, when its model changed on disk since it was opened, the model opened
        again (then `engine` is closed). The new one is opened before the old one is closed: a
        model caught half-written, or broken, leaves the old one answering rather than none. A
        change that fails to load is tried once, not before every reply."""
        stamp = model_stamp(self.model)
        if stamp == self._loaded:
            return engine
        self._loaded = stamp
        try:
            new = self._open()
        except Exception as exc:   # noqa: BLE001 (whatever stops it loading, the old model still answers)
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            self._note(f"{self.model} changed on disk but did not load ({reason}); "
                       "still answering with the one loaded before", False)
            return engine
        engine.close()
        self._note(f"{self.model} changed on disk (retrained or exported): loaded again", True)
        return new
