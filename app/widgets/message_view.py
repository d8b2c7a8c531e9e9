"""One chat message: who said it, and its text rendered as Markdown.

While an answer streams the Markdown is re-rendered from the whole text at each repaint, so code
fences that open mid-stream are drawn correctly once they close; the final text gets one more
full render.
"""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown text, without their fences."""
    return [block.rstrip("\n") for block in _FENCE.findall(text)]


class MessageView(Vertical, can_focus=True):
    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 0 1 0; padding: 0 1; border-left: wide $panel; }
    MessageView.user { border-left: wide $secondary; }
    MessageView.assistant { border-left: wide $primary; }
    MessageView:focus { background: $boost; border-left: wide $accent; }
    MessageView > .who { color: $text-muted; text-style: bold; }
    MessageView > Markdown { margin: 0; padding: 0; }
    """

    def __init__(self, role: str, text: str, who: str, message_id: int = 0, note: str = "") -> None:
        super().__init__(classes=role)
        self.role = role
        self.text = text
        self.message_id = message_id
        self._who = who
        self._note = note

    def compose(self) -> ComposeResult:
        yield Static(self._label(), classes="who")
        yield Markdown(self.text or "…")

    def _label(self) -> str:
        return f"{self._who}  [dim]{self._note}[/]" if self._note else self._who

    def set_text(self, text: str) -> None:
        self.text = text
        self.query_one(Markdown).update(text or "…")

    def set_note(self, note: str) -> None:
        self._note = note
        self.query_one(".who", Static).update(self._label())
