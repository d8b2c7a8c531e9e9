"""The chat input: one line, Enter sends, Up and Down walk through earlier prompts."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "older", "Older prompt", show=False),
        Binding("down", "newer", "Newer prompt", show=False),
    ]

    def __init__(self, history: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[str] = list(history or [])
        self._index = len(self.history)
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._index = len(self.history)
        self._draft = ""

    def action_older(self) -> None:
        if not self.history or self._index == 0:
            return
        if self._index == len(self.history):
            self._draft = self.value
        self._index -= 1
        self._show(self.history[self._index])

    def action_newer(self) -> None:
        if self._index >= len(self.history):
            return
        self._index += 1
        self._show(self.history[self._index] if self._index < len(self.history) else self._draft)

    def _show(self, text: str) -> None:
        self.value = text
        self.cursor_position = len(text)
