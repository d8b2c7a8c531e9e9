"""The Devices screen: this device, the devices heard on the network and the paired ones.

Pair (p) asks the selected device to pair and shows the code to compare; unpair (u) forgets it
on both sides. The list refreshes in a worker every few seconds and whenever the mesh reports a
change.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from app.messages import DevicesChanged, PairingFinished, TaskDone
from app.services.devices import DeviceRow, DevicesService, OutgoingPair
from app.widgets.dialogs import ConfirmDialog, PairingDialog

REFRESH_S = 3.0

EXPLAIN = (
    "Paired devices can train together: when you start a job on several devices, the training data "
    "is sent to them encrypted, and nowhere else (a federated job sends none: each device trains on "
    "its own). Unpaired devices only see this device's name."
)


class DevicesScreen(Screen):
    CSS_PATH = "../styles/devices.tcss"
    BINDINGS = [
        Binding("p", "pair", "Pair", id="pair"),
        Binding("u", "unpair", "Unpair", id="unpair"),
        Binding("r", "refresh", "Refresh", id="refresh"),
    ]

    def __init__(self, devices: DevicesService, refresh_s: float = REFRESH_S) -> None:
        super().__init__(id="devices-screen")
        self.devices = devices
        self.rows: list[DeviceRow] = []
        self._refresh_s = refresh_s

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="devices-body"):
            yield Static(EXPLAIN, id="devices-explain")
            yield Input(placeholder="Add a device by address (host:port), Enter", id="add-address")
            yield DataTable(id="device-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="devices-status")
            yield Static("", id="private-data")
            yield Input(placeholder="Offer your own data to federated jobs (a notes folder or a JSONL of chats), Enter",
                        id="private-path")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Devices"
        table = self.query_one(DataTable)
        table.add_columns("Device", "Kind", "Memory", "Cores", "State", "Paired", "Address")
        self.action_refresh()
        self.set_interval(self._refresh_s, self.action_refresh)
        table = self.query_one(DataTable)
        table.focus()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Devices: pair the selected device", "compare a 6-digit code on both devices", self.action_pair),
            ("Devices: unpair the selected device", "it can no longer train with this one", self.action_unpair),
            ("Devices: refresh", "list the devices again", self.action_refresh),
            ("Devices: stop offering private data", "federated jobs no longer train on this device's data",
             self.action_withdraw_private),
        ]

    def action_refresh(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="devices")
    def _load(self) -> None:
        self.post_message(DevicesChanged(self.devices.devices()))

    @on(DevicesChanged)
    def _show(self, message: DevicesChanged) -> None:
        self.rows = message.devices
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for row in self.rows:
            table.add_row(
                row.name + (" (this device)" if row.this_device else ""),
                row.kind,
                f"{row.memory_gb:g} GB" if row.memory_gb else "?",
                str(row.cores) if row.cores else "?",
                row.state,
                "yes" if row.paired else "no",
                row.address,
                key=row.id or "this",
            )
        if self.rows:
            table.move_cursor(row=min(keep, len(self.rows) - 1))
        heard = sum(1 for r in self.rows if not r.this_device)
        status = f"{heard} other device(s) known." if heard else "No other device heard yet: start Hearth on another computer at home."
        if self.devices.error:
            status = self.devices.error
        self.query_one("#devices-status", Static).update(status)
        self.query_one("#private-data", Static).update(self.devices.private_data_statement())

    @on(Input.Submitted, "#add-address")
    def _add_address(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.query_one("#devices-status", Static).update(f"Asking {event.value.strip()} who it is…")
            self._add(event.value.strip())
            event.input.value = ""

    @on(Input.Submitted, "#private-path")
    def _offer_private(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.query_one("#private-data", Static).update(f"Reading {event.value.strip()}…")
            path = event.value.strip()
            self._change_private(lambda: self.devices.offer_private_data(path),
                                 "Offered to federated jobs; it stays on this device.")
            event.input.value = ""

    def action_withdraw_private(self) -> None:
        self._change_private(self.devices.withdraw_private_data,
                             "Federated jobs no longer train on this device's data.")

    @work(thread=True, exit_on_error=False, group="private")
    def _change_private(self, change, done: str) -> None:
        """Offer or withdraw private data in a worker (offering reads every file)."""
        try:
            change()
            self.post_message(TaskDone("private", done))
        except Exception as exc:  # noqa: BLE001 - a HearthError names the file and line
            self.post_message(TaskDone("private", "", str(exc) or type(exc).__name__))

    @work(thread=True, exit_on_error=False, group="add")
    def _add(self, address: str) -> None:
        try:
            row = self.devices.add_address(address)
            self.post_message(TaskDone("add", f"Found {row.name} at {address}: select it and press p to pair."))
        except Exception as exc:  # noqa: BLE001
            self.post_message(TaskDone("add", "", str(exc) or type(exc).__name__))

    def _selected(self) -> DeviceRow | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row < 0 or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def action_pair(self) -> None:
        row = self._selected()
        if row is None or row.this_device:
            self.notify("Choose another device to pair with.")
            return
        if row.paired:
            self.notify(f"{row.name} is already paired.")
            return
        self.query_one("#devices-status", Static).update(f"Asking {row.name} to pair…")
        self._pair(row.id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="pair")
    def _pair(self, device_id: str) -> None:
        try:
            outgoing = self.devices.pair(device_id)
        except Exception as exc:  # noqa: BLE001
            self.post_message(PairingFinished(False, str(exc)))
            return
        self.app.call_from_thread(self._ask, outgoing)

    def _ask(self, outgoing: OutgoingPair) -> None:
        def decided(accepted: bool | None) -> None:
            if accepted:
                self.query_one("#devices-status", Static).update(f"Waiting for {outgoing.peer_name} to accept…")
                self._confirm(outgoing)
            else:
                outgoing.cancel()
                self.post_message(PairingFinished(False, "Pairing cancelled."))

        self.app.push_screen(PairingDialog(
            "Pair with another device", f"Pairing with {outgoing.peer_name}", outgoing.code, outgoing.grant), decided)

    @work(thread=True, exit_on_error=False, group="pair-confirm")
    def _confirm(self, outgoing: OutgoingPair) -> None:
        paired, text = outgoing.confirm()
        self.post_message(PairingFinished(paired, text or ("Paired." if paired else "Not paired.")))

    @on(PairingFinished)
    def _paired(self, message: PairingFinished) -> None:
        self.notify(message.text, title="Pairing", severity="information" if message.paired else "warning")
        self.query_one("#devices-status", Static).update(message.text)
        self.action_refresh()

    def action_unpair(self) -> None:
        row = self._selected()
        if row is None or row.this_device or not row.paired:
            self.notify("Choose a paired device to unpair.")
            return

        def decided(yes: bool | None) -> None:
            if yes:
                self._unpair(row.id)

        self.app.push_screen(ConfirmDialog(
            f"Unpair {row.name}? It will no longer train with this device, and must pair again to do so.",
            "Unpair"), decided)

    @work(thread=True, exit_on_error=False, group="unpair")
    def _unpair(self, device_id: str) -> None:
        try:
            name = self.devices.unpair(device_id)
            self.post_message(TaskDone("unpair", f"Unpaired {name}."))
        except Exception as exc:  # noqa: BLE001
            self.post_message(TaskDone("unpair", "", str(exc)))

    @on(TaskDone)
    def _done(self, message: TaskDone) -> None:
        self.notify(message.error or message.text, severity="error" if message.error else "information")
        self.action_refresh()
