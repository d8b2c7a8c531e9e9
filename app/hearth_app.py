"""The Hearth app: four modes (Chat, Devices, Train, Models), each its own screen stack.

The app receives its services (app/services) in its constructor and hands each screen the ones it
needs. It starts the mesh and decides whether to show the first-run guide in workers, after the
first frame, so it opens at once; models load lazily in the Chat screen's worker. An incoming
pairing request pops up over whatever screen is showing.

Quitting while a training job or a download runs asks first, then waits for the job to stop at
its next step (its checkpoint kept). A terminal that hangs up (SIGHUP, or a hang-up seen by
app/terminal.py) closes the app the same way, without asking, with exit status 129.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.screen import Screen

from app import terminal
from app.messages import PairingRequested
from app.services import Services

MODES = ("chat", "devices", "train", "models")

# Binding ids a user may remap in the config's [keys] section (action = "key").
REMAPPABLE = (
    "quit", "chat", "devices", "train", "models", "palette",
    "stop", "new_chat", "regenerate", "teach", "copy", "copy_code", "export", "system_prompt",
    "pair", "unpair", "refresh", "start", "cancel", "resume",
    "set_active", "download", "stop_download", "export_gguf", "delete",
)


class ScreenCommands(Provider):
    """The palette offers the commands of the screen on show, and the mode switches."""

    def _commands(self) -> list[tuple[str, str, object]]:
        app = self.app
        commands: list[tuple[str, str, object]] = []
        screen = app.screen
        # A modal over a mode screen: offer the mode screen's commands.
        for candidate in reversed(app.screen_stack):
            if hasattr(candidate, "palette_commands"):
                screen = candidate
                break
        if hasattr(screen, "palette_commands"):
            commands += screen.palette_commands()
        for mode in MODES:
            commands.append((f"Go to {mode.title()}", f"switch to the {mode} screen",
                             lambda mode=mode: app.switch_mode(mode)))
        return commands

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield Hit(1.0, title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)


class HearthApp(App):
    TITLE = "Hearth"
    CSS_PATH = "styles/app.tcss"
    # Every screen gets "-narrow" below 110 columns (an 80-column terminal); chat.tcss and
    # train.tcss give the conversation and the training progress the room there.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    COMMANDS = {ScreenCommands}
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("f1", "switch_mode('chat')", "Chat", id="chat"),
        Binding("f2", "switch_mode('devices')", "Devices", id="devices"),
        Binding("f3", "switch_mode('train')", "Train", id="train"),
        Binding("f4", "switch_mode('models')", "Models", id="models"),
        # Not shown among the others: the footer shows the palette's key at its right edge
        # already, where a narrow terminal does not cut it off (it was shown twice).
        Binding("ctrl+p", "command_palette", "Commands", id="palette", priority=True, show=False),
    ]

    def __init__(self, services: Services, start_mesh: bool = True, theme: str | None = None) -> None:
        super().__init__()
        self.services = services
        self.start_mesh = start_mesh
        self.first_run: bool | None = None  # known once the startup worker has looked
        self.add_mode("chat", self._chat_screen)
        self.add_mode("devices", self._devices_screen)
        self.add_mode("train", self._train_screen)
        self.add_mode("models", self._models_screen)
        self.set_keymap(keymap_from_config(services.config.section("keys")))
        self._theme_name = choose_theme(theme or str(services.config.section("app").get("theme", "auto")))
        if self._theme_name not in self.available_themes:
            from core.errors import HearthError

            raise HearthError(f"config.toml: app.theme {self._theme_name!r} is not a theme "
                              f"(auto, light, dark, or one of: {', '.join(sorted(self.available_themes))})")

    def _chat_screen(self) -> Screen:
        from app.screens.chat import ChatScreen

        return ChatScreen(self.services.chat)

    def _devices_screen(self) -> Screen:
        from app.screens.devices import DevicesScreen

        return DevicesScreen(self.services.devices)

    def _train_screen(self) -> Screen:
        from app.screens.train import TrainScreen

        return TrainScreen(self.services.train, self.services.models, self.services.devices)

    def _models_screen(self) -> Screen:
        from app.screens.models import ModelsScreen

        return ModelsScreen(self.services.models)

    def on_mount(self) -> None:
        self.theme = self._theme_name
        self.services.devices.on_pairing_request(lambda request: self.post_message(PairingRequested(request)))
        self.switch_mode("chat")
        # Background work starts once the first frame is drawn: its imports (llama.cpp, the
        # mesh's crypto and mDNS) would otherwise hold the interpreter while the screen waits.
        self.call_after_refresh(self._after_first_frame)
        if not self.is_headless:
            self._watch_terminal()

    def _watch_terminal(self) -> None:
        if hasattr(signal, "SIGHUP"):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.hang_up)
        if terminal.can_watch(sys.__stdin__.fileno()):      # the terminal Textual reads
            self.set_interval(terminal.HANG_UP_CHECK_S, self._check_terminal)

    def _check_terminal(self) -> None:
        if terminal.hung_up(sys.__stdin__.fileno()):
            self.hang_up()

    def hang_up(self) -> None:
        """The terminal has gone. Exiting stops answers (stored as stopped) and training jobs
        (checkpoints kept) in `on_unmount`."""
        self.exit(return_code=terminal.HUNG_UP_EXIT_STATUS)

    async def action_quit(self) -> None:
        training, downloads = self.services.train.running(), self.services.models.downloading()
        if not training and not downloads:
            self.exit()
            return
        from app.widgets.dialogs import ConfirmDialog

        said = []
        if training:
            said.append("A training job is running: stopped, it keeps its last checkpoint, and Resume "
                        "on the Train screen (F3) carries it on.")
        if downloads:
            said.append(f"{' and '.join(downloads)} {'is' if len(downloads) == 1 else 'are'} downloading: "
                        "stopped, the files already complete are kept, and downloading again (g on "
                        "Models, F4) fetches the rest.")

        def decided(stop: bool | None) -> None:
            if stop and training:
                self.notify("Stopping the training job at its next step; Hearth closes then.", title="Quit")
                self._stop_jobs_then_exit()
            elif stop:
                self.exit()       # closing stops the downloads (Services.close)

        self.push_screen(ConfirmDialog(" ".join(said) + " Stop and quit?", yes="Stop and quit"), decided)

    @work(thread=True, exit_on_error=False, group="quit")
    def _stop_jobs_then_exit(self) -> None:
        self.services.train.stop_all()
        self.call_from_thread(self.exit)

    def _after_first_frame(self) -> None:
        self._first_run_check()
        if self.start_mesh:
            self._start_mesh()

    @work(thread=True, exit_on_error=False, group="startup")
    def _first_run_check(self) -> None:
        """With no paired device and no personalised model, the chat shows the three steps."""
        first_run = self.services.devices.paired_count() == 0 and self.services.models.personal_count() == 0
        self.call_from_thread(self._show_guide, first_run)

    def _show_guide(self, visible: bool) -> None:
        from app.screens.chat import ChatScreen

        self.first_run = visible
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen) and screen.is_mounted:
                screen.set_guide(visible)

    @work(thread=True, exit_on_error=False, group="mesh")
    def _start_mesh(self) -> None:
        self.services.devices.start()

    @on(PairingRequested)
    def _pairing_requested(self, message: PairingRequested) -> None:
        from app.widgets.dialogs import PairingDialog

        request = message.request

        def decided(accepted: bool | None) -> None:
            if accepted:
                request.accept()
                self.notify(f"Accepted: {request.peer_name} is paired once it confirms too (F2 shows it).",
                            title="Pairing")
            elif accepted is None:   # closed by itself: expired, or withdrawn by the other device
                request.reject()
                self.notify(f"The pairing request from {request.peer_name} expired or was withdrawn.",
                            title="Pairing")
            else:
                request.reject()
                self.notify(f"Pairing with {request.peer_name} rejected.", title="Pairing")

        self.push_screen(PairingDialog(
            "A device asks to pair with this one",
            f"{request.peer_name} ({request.peer_kind}, {request.address})",
            request.code, request.grant, expires_at=request.expires_at,
            settled=lambda: request.decided), decided)

    def on_unmount(self) -> None:
        if not self.is_headless and hasattr(signal, "SIGHUP"):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.services.close()


def keymap_from_config(keys: dict[str, str]) -> dict[str, str]:
    """The config's [keys] (action = "key") as a Textual keymap; unknown actions are refused."""
    from core.errors import HearthError

    keymap = {}
    for action, key in keys.items():
        if action not in REMAPPABLE:
            raise HearthError(f"config.toml: keys.{action} is not an action of the app "
                              f"(one of: {', '.join(REMAPPABLE)})")
        keymap[action] = key
    return keymap


def choose_theme(choice: str) -> str:
    """The Textual theme: "auto" follows the terminal's light/dark preference (COLORFGBG)."""
    if choice == "light":
        return "textual-light"
    if choice == "dark":
        return "textual-dark"
    if choice != "auto":
        return choice
    # COLORFGBG="fg;bg" (xterm, rxvt, konsole, iTerm...): a background colour 7 or 9-15 is light.
    background = os.environ.get("COLORFGBG", "").split(";")[-1]
    if background.isdigit() and (int(background) == 7 or 9 <= int(background) <= 15):
        return "textual-light"
    return "textual-dark"
