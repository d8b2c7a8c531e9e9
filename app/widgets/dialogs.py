"""Small modal dialogs: confirm, edit a text, pairing (with the code and what pairing grants)."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static, TextArea


class ConfirmDialog(ModalScreen[bool]):
    DEFAULT_CSS = """
    ConfirmDialog { align: center middle; }
    ConfirmDialog > Vertical { width: 64; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    ConfirmDialog Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmDialog Button { margin-left: 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self._question = question
        self._yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self._question, id="question")
            with Horizontal():
                yield Button("Cancel", id="no")
                yield Button(self._yes, id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_cancel(self) -> None:
        self.dismiss(False)


class EditDialog(ModalScreen[str | None]):
    """Edit a text (a taught answer, a system prompt): Ctrl-S saves, Esc cancels."""

    DEFAULT_CSS = """
    EditDialog { align: center middle; }
    EditDialog > Vertical { width: 90%; height: 80%; border: thick $primary; background: $surface; padding: 1 2; }
    EditDialog TextArea { height: 1fr; }
    EditDialog .explain { color: $text-muted; margin-bottom: 1; }
    EditDialog Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    EditDialog Button { margin-left: 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, title: str, explanation: str, text: str, save_label: str = "Save") -> None:
        super().__init__()
        self._title = title
        self._explanation = explanation
        self._text = text
        self._save_label = save_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{self._title}[/]")
            yield Static(self._explanation, classes="explain")
            yield TextArea(self._text, id="text")
            with Horizontal():
                yield Button("Cancel (Esc)", id="cancel")
                yield Button(f"{self._save_label} (Ctrl-S)", id="save", variant="primary")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PairingDialog(ModalScreen[bool]):
    """Show a pairing code and what pairing grants; True when the person confirms the codes match."""

    DEFAULT_CSS = """
    PairingDialog { align: center middle; }
    PairingDialog > Vertical { width: 70; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    PairingDialog .code { text-align: center; text-style: bold; color: $accent; padding: 1 0; width: 100%; }
    PairingDialog .grant { color: $text-muted; margin-top: 1; }
    PairingDialog Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    PairingDialog Button { margin-left: 2; }
    """
    BINDINGS = [Binding("escape", "reject", "Reject")]

    def __init__(self, title: str, who: str, code: str, grant: str, yes: str = "Codes match: pair",
                 expires_at: float | None = None, settled: Callable[[], bool] | None = None) -> None:
        """`expires_at` (epoch seconds) and `settled()` (the request was decided elsewhere, e.g.
        withdrawn by the other device) close the dialog with None: a stale code must not linger."""
        super().__init__()
        self._title, self._who, self._code, self._grant, self._yes = title, who, code, grant, yes
        self._expires_at, self._settled = expires_at, settled

    def compose(self) -> ComposeResult:
        spaced = f"{self._code[:3]} {self._code[3:]}" if len(self._code) == 6 else self._code
        with Vertical():
            yield Label(f"[b]{self._title}[/]")
            yield Static(self._who)
            yield Static(spaced, classes="code", id="code")
            yield Static("Check that the other device shows the same six digits. If it does not, "
                         "reject: someone else may be trying to pair.")
            yield Static(f"What pairing grants: {self._grant} You can unpair at any time.", classes="grant")
            if self._expires_at is not None:
                yield Static(self._countdown(), id="expiry", classes="grant")
            with Horizontal():
                yield Button("Reject (Esc)", id="reject", variant="error")
                yield Button(self._yes, id="accept", variant="success")

    def on_mount(self) -> None:
        if self._expires_at is not None or self._settled is not None:
            self.set_interval(0.5, self._check)

    def _countdown(self) -> str:
        left = max(0, round((self._expires_at or 0) - time.time()))
        return f"This request expires in {left} s."

    def _check(self) -> None:
        if not self.is_active:
            # Not the top screen: the app is closing (the timer can fire once more after the
            # stack is gone), or another dialog is above; it closes when it is on top again.
            return
        expired = self._expires_at is not None and time.time() >= self._expires_at
        if expired or (self._settled is not None and self._settled()):
            self.dismiss(None)
        elif self._expires_at is not None:
            self.query_one("#expiry", Static).update(self._countdown())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "accept")

    def action_reject(self) -> None:
        self.dismiss(False)
