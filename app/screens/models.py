"""The Models screen: base and personalised models, with what each is and how it was made.

Set active (a) makes a model the one chat uses; export (e) writes a GGUF that llama.cpp runs;
delete (d) removes a personalised model after a confirmation. Export and delete run in workers.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.messages import TaskDone
from app.services.models import ModelInfo, ModelsService
from app.widgets.dialogs import ConfirmDialog


class ModelsChanged(TaskDone):
    pass


class ModelsScreen(Screen):
    CSS_PATH = "../styles/models.tcss"
    BINDINGS = [
        Binding("a", "set_active", "Set active", id="set_active"),
        Binding("e", "export_gguf", "Export GGUF", id="export_gguf"),
        Binding("d", "delete", "Delete", id="delete"),
        Binding("r", "refresh", "Refresh", id="refresh"),
    ]

    def __init__(self, models: ModelsService) -> None:
        super().__init__(id="models-screen")
        self.models = models
        self.rows: list[ModelInfo] = []

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
                ("ready" if m.has_gguf else "ready (torch)") if m.available else "not downloaded",
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
        if m.kind == "personal" and not m.has_gguf:
            text += " Chat runs it through torch; export it (e) for llama.cpp, faster, if it can be merged."
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
        try:
            self.models.set_active(m.name)
        except Exception as exc:  # noqa: BLE001
            self.notify(str(exc), severity="error")
            return
        self.notify(f"Chat now uses {m.name} (new conversations).")
        self.action_refresh()

    def action_export_gguf(self) -> None:
        m = self._selected()
        if m is None:
            return
        if m.kind != "personal":
            self.notify("Base models are GGUF files already.")
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

    @on(ModelsChanged)
    def _changed(self, message: ModelsChanged) -> None:
        self.notify(message.error or message.text, severity="error" if message.error else "information")
        self.query_one("#models-status", Static).update(message.error or message.text)
        self.action_refresh()
