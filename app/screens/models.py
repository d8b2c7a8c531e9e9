"""The Models screen: base and personalised models, with what each is and how it was made.

Set active (a) makes a model the one chat uses; download (g) fetches a catalog model that is not
here yet, with its progress below the table, and x stops it (files already complete are kept);
export (e) writes a GGUF that llama.cpp runs; delete (d) removes a personalised model after a
confirmation. Downloads, exports and deletes run in workers.
"""

from __future__ import annotations

import threading

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.messages import TaskDone
from app.services.models import ModelInfo, ModelsService
from app.widgets.dialogs import ConfirmDialog


class ModelsChanged(TaskDone):
    pass


class DownloadProgress(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ModelsScreen(Screen):
    CSS_PATH = "../styles/models.tcss"
    BINDINGS = [
        Binding("a", "set_active", "Set active", id="set_active"),
        Binding("g", "download", "Download", id="download"),
        Binding("x", "stop_download", "Stop download", id="stop_download"),
        Binding("e", "export_gguf", "Export GGUF", id="export_gguf"),
        Binding("d", "delete", "Delete", id="delete"),
        Binding("r", "refresh", "Refresh", id="refresh"),
    ]

    def __init__(self, models: ModelsService) -> None:
        super().__init__(id="models-screen")
        self.models = models
        self.rows: list[ModelInfo] = []
        self._download_cancel: threading.Event | None = None   # set while a download runs

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models-body"):
            yield DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="model-details")
            yield Static("", id="models-status")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Models"
        self.query_one(DataTable).add_columns("", "Model", "Type", "Parameters", "Size", "Pruned", "Trained", "State")
        self.action_refresh()

    def on_screen_resume(self) -> None:
        if self.is_mounted:
            self.action_refresh()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Models: set active", "chat with the selected model", self.action_set_active),
            ("Models: download", "fetch the selected catalog model to this device", self.action_download),
            ("Models: export to GGUF", "write a file llama.cpp and other apps run", self.action_export_gguf),
            ("Models: delete", "delete the selected personalised model", self.action_delete),
        ]

    def action_refresh(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="models")
    def _load(self) -> None:
        rows = self.models.models()
        self.app.call_from_thread(self._show, rows)

    def _show(self, rows: list[ModelInfo]) -> None:
        self.rows = rows
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for m in rows:
            table.add_row(
                "●" if m.active else "", m.name, m.kind, m.parameters,
                f"{m.size_mb:.0f} MB" if m.size_mb else "?",
                f"{m.pruning:.0%}" if m.pruning else "-",
                m.trained or "-",
                _state(m),
                key=m.name,
            )
        if rows:
            table.move_cursor(row=max(0, min(keep, len(rows) - 1)))
        self._describe()

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._describe()

    def _describe(self) -> None:
        m = self._selected()
        if m is None:
            return
        text = f"[b]{m.name}[/b]: {m.title}."
        if m.active:
            text += " Chat uses this model."
        if m.problem:
            text += f" {m.problem}."
        elif not m.available:
            text += f" Not on this device yet: download it (g, {m.size_mb:.0f} MB)."
        if m.kind == "personal" and not m.has_gguf:
            text += (" Chat runs it through torch; export it (e) to GGUF for llama.cpp, faster." if m.mergeable else
                     " Chat runs it through torch: its parallel adapters cannot be merged into a GGUF.")
        self.query_one("#model-details", Static).update(text)

    def _selected(self) -> ModelInfo | None:
        table = self.query_one(DataTable)
        if not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def action_set_active(self) -> None:
        m = self._selected()
        if m is None:
            return
        if not m.available:
            self.notify(m.problem or f"{m.name} is not on this device yet: download it first (g).")
            return
        try:
            self.models.set_active(m.name)
        except Exception as exc:  # noqa: BLE001
            self.notify(str(exc), severity="error")
            return
        self.notify(f"Chat now uses {m.name} (new conversations).")
        self.action_refresh()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_download":        # shown in the footer only while a download runs
            return self._download_cancel is not None
        return True

    def action_download(self) -> None:
        m = self._selected()
        if m is None:
            return
        if m.available or m.problem:
            self.notify(m.problem or f"{m.name} is on this device already.")
            return
        if self._download_cancel is not None:
            self.notify("A download is running already; x stops it.")
            return
        self._download_cancel = threading.Event()
        self.refresh_bindings()
        self.query_one("#models-status", Static).update(f"Downloading {m.name}…")
        self._download(m.name, self._download_cancel)

    def action_stop_download(self) -> None:
        if self._download_cancel is not None:
            self._download_cancel.set()

    @work(thread=True, exit_on_error=False, group="download")
    def _download(self, name: str, cancel: threading.Event) -> None:
        def progress(here_mb: float, total_mb: float) -> None:
            # A message, not call_from_thread: that would wait on the app's loop, and hang
            # this thread (and the exit) if the app is closing.
            self.post_message(DownloadProgress(
                f"Downloading {name}: {here_mb:.0f} of about {total_mb:.0f} MB (x stops)"))

        try:
            self.models.download(name, progress, cancel)
            self.post_message(ModelsChanged("download", f"Downloaded {name}: set it active (a) to chat with it."))
        except Exception as exc:  # noqa: BLE001 - a HearthError says what went wrong
            self.post_message(ModelsChanged("download", "", str(exc)))

    def action_export_gguf(self) -> None:
        m = self._selected()
        if m is None:
            return
        if m.kind != "personal":
            self.notify("Base models are GGUF files already.")
            return
        if not m.mergeable:
            self.notify(f"{m.name} has parallel adapters, which cannot be merged into a GGUF: "
                        "chat runs it through torch. Train with LoRA for a model that exports.")
            return
        self.query_one("#models-status", Static).update(f"Exporting {m.name} to GGUF… (minutes)")
        self._export(m.name)

    @work(thread=True, exit_on_error=False, group="export")
    def _export(self, name: str) -> None:
        try:
            path = self.models.export_gguf(name)
            self.post_message(ModelsChanged("export", f"Exported {name} to {path}"))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ModelsChanged("export", "", str(exc)))

    def action_delete(self) -> None:
        m = self._selected()
        if m is None:
            return
        if m.kind != "personal":
            self.notify("Base models cannot be deleted.")
            return

        def decided(yes: bool | None) -> None:
            if yes:
                self._delete(m.name)

        self.app.push_screen(ConfirmDialog(
            f"Delete {m.name}? Its weights are removed from this device; this cannot be undone. "
            "The data it was trained on is not touched.", "Delete"), decided)

    @work(thread=True, exit_on_error=False, group="delete")
    def _delete(self, name: str) -> None:
        try:
            self.models.delete(name)
            self.post_message(ModelsChanged("delete", f"Deleted {name}."))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ModelsChanged("delete", "", str(exc)))

    @on(DownloadProgress)
    def _download_progress(self, message: DownloadProgress) -> None:
        if self._download_cancel is not None:     # not a late one, after the end
            self.query_one("#models-status", Static).update(message.text)

    @on(ModelsChanged)
    def _changed(self, message: ModelsChanged) -> None:
        if message.what == "download":
            self._download_cancel = None
            self.refresh_bindings()
        self.notify(message.error or message.text, severity="error" if message.error else "information")
        self.query_one("#models-status", Static).update(message.error or message.text)
        self.action_refresh()


def _state(m: ModelInfo) -> str:
    if m.problem:
        return "base missing"
    if not m.available:
        return "not downloaded"
    return "ready" if m.has_gguf else "ready (torch)"
