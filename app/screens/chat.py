"""The Chat screen: conversations from the history, streamed answers, teach, copy, export.

A stream belongs to the conversation it started in: its messages carry the conversation's id,
and switching conversations mid-stream only changes what is shown; the answer is stored where
it started. Esc stops an answer; what came so far is kept, marked stopped.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static

from app.messages import EngineReady, ReplyFailed, ReplyFinished, ReplyProgress, TaskDone
from app.services.chat import ChatService
from app.widgets.dialogs import EditDialog
from app.widgets.message_view import MessageView, code_blocks
from app.widgets.prompt_input import PromptInput

REPAINT_S = 0.1  # ~10 Hz: often enough to look live, rarely enough to stay cheap

GUIDE = """[b]Welcome to Hearth[/b]

Everything stays in this home: no account, no cloud.

[b]1. Pair[/b]  (F2, Devices)
Pair the family's other laptops and desktops to train faster together.

[b]2. Teach[/b]  (Ctrl-T on an answer)
When an answer is wrong, write what it should have said. It is saved as training data on this
device, and Train (F3) teaches it to a model of your own.

[b]3. Chat[/b]
Type below: the bundled model answers right away, offline.
"""

# The same three steps in three lines, above the conversation on a narrow terminal, where the
# guide's column would leave the answer too little room.
GUIDE_SHORT = """[b]Welcome to Hearth[/b]: everything stays in this home.
[b]1. Pair[/b] devices (F2)  [b]2. Teach[/b] an answer (Ctrl-T)
[b]3. Chat[/b]: type below, offline."""


class ConversationItem(ListItem):
    def __init__(self, conversation_id: int, title: str) -> None:
        super().__init__(Label(title))
        self.conversation_id = conversation_id


class ChatScreen(Screen):
    CSS_PATH = "../styles/chat.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+t", "teach", "Teach", id="teach"),
        Binding("ctrl+y", "copy_message", "Copy", id="copy"),
        Binding("ctrl+b", "copy_code", "Copy code", id="copy_code", show=False),
        Binding("ctrl+s", "export", "Export", id="export", show=False),
        Binding("ctrl+o", "system_prompt", "System prompt", id="system_prompt", show=False),
    ]

    def __init__(self, chat: ChatService, show_guide: bool = False) -> None:
        super().__init__(id="chat-screen")
        self.chat = chat
        self.show_guide = show_guide
        self.conversation_id: int | None = None
        self._stream_id = 0
        self._stream_conversation: int | None = None
        self._stream_text = ""
        self._cancel = threading.Event()
        self._live: MessageView | None = None
        self._status = "Loading the model…"

    # --- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-body"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="title")
                yield ListView(id="conversations")
            with Vertical(id="main"):
                yield Static(GUIDE_SHORT, id="guide-short")
                yield VerticalScroll(id="transcript")
                yield Static(self._status, id="chat-status")
                yield PromptInput(self.chat.prompt_history(), placeholder="Ask anything, Enter to send",
                                  id="prompt")
            yield Static(GUIDE, id="guide", classes="" if self.show_guide else "hidden")
        yield Footer()

    def on_mount(self) -> None:
        self.set_class(self.show_guide, "-guide")
        self.title = "Hearth"
        self.sub_title = "Chat"
        self._fill_conversations()
        conversations = self.chat.conversations()
        if conversations:
            self._open(conversations[0].id)
        self.query_one("#prompt", PromptInput).focus()
        if getattr(self.app, "first_run", None):
            self.set_guide(True)
        # After the first frame: loading llama.cpp must not delay it.
        self.call_after_refresh(self._load_engine, self.chat.default_model)

    def on_screen_resume(self) -> None:
        first_run = getattr(self.app, "first_run", None)
        if first_run is not None and self.is_mounted:
            self.set_guide(first_run)

    def set_guide(self, visible: bool) -> None:
        self.show_guide = visible
        self.query_one("#guide").set_class(not visible, "hidden")
        self.set_class(visible, "-guide")  # the short guide's cue on narrow terminals

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Chat: new conversation", "start an empty conversation", self.action_new_chat),
            ("Chat: regenerate the last answer", "ask the model again", self.action_regenerate),
            ("Chat: teach the right answer", "correct an answer; saved as training data", self.action_teach),
            ("Chat: copy the message", "copy the selected (or last) answer", self.action_copy_message),
            ("Chat: copy the code blocks", "copy the code of the selected (or last) answer", self.action_copy_code),
            ("Chat: export to Markdown", "write this conversation to a .md file", self.action_export),
            ("Chat: system prompt", "set this conversation's system prompt", self.action_system_prompt),
            ("Chat: delete conversation", "remove this conversation from the history", self.action_delete_chat),
        ]

    # --- conversations ---------------------------------------------------------------------

    def _fill_conversations(self) -> None:
        view = self.query_one("#conversations", ListView)
        view.clear()
        items = [ConversationItem(c.id, c.title or "New conversation") for c in self.chat.conversations()]
        if items:
            view.extend(items)
        self._mark_current()

    def _mark_current(self) -> None:
        view = self.query_one("#conversations", ListView)
        for index, item in enumerate(view.children):
            if getattr(item, "conversation_id", None) == self.conversation_id:
                view.index = index

    @on(ListView.Selected, "#conversations")
    def _picked(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            self._open(event.item.conversation_id)
            self.query_one("#prompt", PromptInput).focus()

    def _open(self, conversation_id: int) -> None:
        self.conversation_id = conversation_id
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.remove_children()
        views = [self._view_of(m) for m in self.chat.messages(conversation_id)]
        self._live = None
        if self._stream_conversation == conversation_id:
            self._live = MessageView("assistant", self._stream_text, "Hearth", note="answering…")
            views.append(self._live)
        if views:
            transcript.mount_all(views)
        transcript.scroll_end(animate=False)
        self._mark_current()

    def _view_of(self, message) -> MessageView:
        who = "You" if message.role == "user" else "Hearth"
        notes = []
        if message.stopped:
            notes.append("stopped")
        if message.taught:
            notes.append("taught")
        return MessageView(message.role, message.content, who, message.id, ", ".join(notes))

    def action_new_chat(self) -> None:
        self.conversation_id = None
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._live = None
        self.query_one("#conversations", ListView).index = None
        self.query_one("#prompt", PromptInput).focus()

    def action_delete_chat(self) -> None:
        if self.conversation_id is None or self._stream_conversation == self.conversation_id:
            return
        from app.widgets.dialogs import ConfirmDialog

        doomed = self.conversation_id

        def decided(yes: bool | None) -> None:
            if yes and self._stream_conversation != doomed:
                self.chat.delete_conversation(doomed)
                if self.conversation_id == doomed:
                    self.action_new_chat()
                self._fill_conversations()

        self.app.push_screen(ConfirmDialog(
            "Delete this conversation? It is erased from this device's history and cannot be brought "
            "back. Answers you taught from it stay in your training data.", "Delete"), decided)

    # --- asking ----------------------------------------------------------------------------

    @on(PromptInput.Submitted, "#prompt")
    def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self._stream_conversation is not None:
            self.notify("An answer is still coming: wait, or press Esc to stop it.", severity="warning")
            return
        prompt = self.query_one("#prompt", PromptInput)
        prompt.remember(text)
        prompt.value = ""
        if self.conversation_id is None:
            self.conversation_id = self.chat.new_conversation().id
            self._fill_conversations()
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(MessageView("user", text, "You"))
        self._start_answer(text)

    def _start_answer(self, question: str | None) -> None:
        assert self.conversation_id is not None
        self._stream_id += 1
        self._stream_conversation = self.conversation_id
        self._stream_text = ""
        self._cancel = threading.Event()
        self._live = MessageView("assistant", "", "Hearth", note="answering…")
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(self._live)
        transcript.scroll_end(animate=False)
        self._set_status("Answering… Esc stops.")
        self._answer(self.conversation_id, self._stream_id, question, self._cancel)

    @work(thread=True, exclusive=True, exit_on_error=False, group="reply")
    def _answer(self, conversation_id: int, stream_id: int, question: str | None, cancel: threading.Event) -> None:
        try:
            if question is not None:
                self.chat.add_user_message(conversation_id, question)
            text = ""
            last_post = 0.0

            def on_piece(piece: str) -> None:
                nonlocal text, last_post
                text += piece
                now = time.monotonic()
                if now - last_post >= REPAINT_S:
                    last_post = now
                    self.post_message(ReplyProgress(conversation_id, stream_id, text))

            reply = self.chat.reply(conversation_id, on_piece, cancel)
            self.post_message(ReplyFinished(conversation_id, stream_id, reply.message.content, reply.stopped,
                                            reply.message.id))
        except Exception as exc:  # noqa: BLE001 - shown to the person, the app goes on
            self.post_message(ReplyFailed(conversation_id, stream_id, str(exc) or type(exc).__name__))

    @on(ReplyProgress)
    def _progress(self, message: ReplyProgress) -> None:
        if message.stream_id != self._stream_id:
            return
        self._stream_text = message.text
        if self._live is not None and message.conversation_id == self.conversation_id:
            self._live.set_text(message.text)
            self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    @on(ReplyFinished)
    def _finished(self, message: ReplyFinished) -> None:
        if message.stream_id != self._stream_id:
            return
        self._stream_conversation = None
        if self._live is not None and message.conversation_id == self.conversation_id:
            live = self._live
            live.message_id = message.message_id
            if message.message_id == 0:
                live.remove()  # stopped before the first word: nothing was stored
            else:
                live.set_text(message.text)
                live.set_note("stopped" if message.stopped else "")
            self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
        self._live = None
        self._set_status(f"{self.chat.loaded_model}: answer stopped." if message.stopped else f"{self.chat.loaded_model}: ready.")
        self._fill_conversations()
        self._show_model_notes()

    @on(ReplyFailed)
    def _failed(self, message: ReplyFailed) -> None:
        if message.stream_id != self._stream_id:
            return
        self._stream_conversation = None
        if self._live is not None:
            self._live.remove()
            self._live = None
        self._set_status(f"No answer: {message.error}")
        self.notify(message.error, title="No answer", severity="error")
        self._show_model_notes()

    def action_stop(self) -> None:
        if self._stream_conversation is not None:
            self._cancel.set()
            self._set_status("Stopping…")

    def action_regenerate(self) -> None:
        if self.conversation_id is None or self._stream_conversation is not None:
            return
        messages = self.chat.messages(self.conversation_id)
        if not messages:
            return
        if messages[-1].role == "assistant":
            self.chat.drop_last_answer(self.conversation_id)
            views = list(self.query(MessageView))
            if views and views[-1].role == "assistant":
                views[-1].remove()
        self._start_answer(None)

    # --- the model -------------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="engine")
    def _load_engine(self, model: str) -> None:
        try:
            self.chat.engine(model)
            self.post_message(EngineReady(model))
        except Exception as exc:  # noqa: BLE001
            self.post_message(EngineReady(model, str(exc) or type(exc).__name__))

    @on(EngineReady)
    def _engine_ready(self, message: EngineReady) -> None:
        if message.error:
            self._set_status(f"Cannot load {message.model}: {message.error}")
        elif self._stream_conversation is None:
            self._set_status(f"{message.model}: ready.")
        self._show_model_notes()

    def _show_model_notes(self) -> None:
        """Say that the model was retrained or exported since it was loaded, and whether the
        new one answers now."""
        for note in self.chat.take_notes():
            self.notify(note.text, severity="information" if note.loaded else "warning")

    def _set_status(self, text: str) -> None:
        self._status = text
        self.query_one("#chat-status", Static).update(text)

    # --- acting on a message ---------------------------------------------------------------

    def _target(self, role: str | None = "assistant") -> MessageView | None:
        focused = self.focused
        if isinstance(focused, MessageView) and (role is None or focused.role == role):
            return focused
        views = [v for v in self.query(MessageView) if (role is None or v.role == role) and v.message_id]
        return views[-1] if views else None

    def action_copy_message(self) -> None:
        view = self._target(role=None)
        if view is not None:
            self._copy(view.text, "message")

    def action_copy_code(self) -> None:
        view = self._target()
        blocks = code_blocks(view.text) if view is not None else []
        if not blocks:
            self.notify("No code block in that answer.")
            return
        self._copy("\n\n".join(blocks), "code block" if len(blocks) == 1 else f"{len(blocks)} code blocks")

    def _copy(self, text: str, what: str) -> None:
        self.app.copy_to_clipboard(text)  # OSC 52: most terminals, also over ssh
        # Fallback for terminals that ignore OSC 52: the desktop's own clipboard tool, if any.
        for tool in (["wl-copy"], ["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"], ["pbcopy"]):
            if shutil.which(tool[0]):
                try:
                    subprocess.run(tool, input=text.encode("utf-8"), timeout=2, check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                except (OSError, subprocess.SubprocessError):
                    continue
                break
        self.notify(f"Copied the {what}.")

    def action_teach(self) -> None:
        view = self._target()
        if view is None or not view.message_id:
            self.notify("Teach works on a finished answer: select one (Tab) or wait for it to end.")
            return

        def save(text: str | None) -> None:
            if text is None or not text.strip():
                return
            try:
                path = self.chat.teach(view.message_id, text)
            except Exception as exc:  # noqa: BLE001 - a HearthError names the problem
                self.notify(str(exc), severity="error")
                return
            view.set_note("taught")
            self.notify(f"Saved as training data in {path} (on this device only). Train (F3) learns it.",
                        title="Taught")

        self.app.push_screen(EditDialog(
            "Teach: what should the answer have been?",
            "Edit the answer into the one you wanted. The question and your answer are saved as "
            "training data on this device; nothing is sent anywhere until you train with it.",
            view.text, "Save as training data"), save)

    def action_system_prompt(self) -> None:
        if self.conversation_id is None:
            self.conversation_id = self.chat.new_conversation().id
            self._fill_conversations()
        conversation_id = self.conversation_id
        current = self.chat.history.conversation(conversation_id).system_prompt

        def save(text: str | None) -> None:
            if text is not None:
                self.chat.set_system_prompt(conversation_id, text.strip())
                self.notify("System prompt saved for this conversation.")

        self.app.push_screen(EditDialog(
            "System prompt of this conversation",
            "Tells the model who it is and how to answer; it applies to this conversation only.",
            current, "Save"), save)

    def action_export(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to export yet.")
            return
        self._export(self.conversation_id)

    @work(thread=True, exit_on_error=False, group="export")
    def _export(self, conversation_id: int) -> None:
        from core.paths import hearth_paths

        target = hearth_paths().exports_dir / f"conversation-{conversation_id}.md"
        try:
            self.chat.export_markdown(conversation_id, target)
            self.post_message(TaskDone("export", f"Exported to {target}"))
        except Exception as exc:  # noqa: BLE001
            self.post_message(TaskDone("export", "", str(exc)))

    @on(TaskDone)
    def _task_done(self, message: TaskDone) -> None:
        if message.error:
            self.notify(message.error, severity="error")
        else:
            self.notify(message.text)
