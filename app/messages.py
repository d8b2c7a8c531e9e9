"""Typed messages that workers post to the app (they never touch widgets themselves).

High-rate messages carry the whole state so far (the reply text, the latest metrics) and say
`can_replace` for an older one of the same stream: when the UI falls behind, Textual drops the
stale ones and paints only the newest. They go to the screen that started the work and stop
there (no bubbling to the app).
"""

from __future__ import annotations

from textual.message import Message


class ReplyProgress(Message):
    """The answer streamed so far in one conversation (the full text, not a piece)."""

    bubble = False

    def __init__(self, conversation_id: int, stream_id: int, text: str) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.stream_id = stream_id
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ReplyProgress) and message.stream_id == self.stream_id


class ReplyFinished(Message):
    """An answer ended (or was stopped) and is stored in the history."""

    bubble = False

    def __init__(self, conversation_id: int, stream_id: int, text: str, stopped: bool, message_id: int) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.stream_id = stream_id
        self.text = text
        self.stopped = stopped
        self.message_id = message_id  # 0: stopped before the first word, nothing stored


class ReplyFailed(Message):
    bubble = False

    def __init__(self, conversation_id: int, stream_id: int, error: str) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.stream_id = stream_id
        self.error = error


class EngineReady(Message):
    """A model finished loading (or failed to: `error` says why)."""

    bubble = False

    def __init__(self, model: str, error: str = "") -> None:
        super().__init__()
        self.model = model
        self.error = error


class DevicesChanged(Message):
    bubble = False

    def __init__(self, devices: list) -> None:
        super().__init__()
        self.devices = devices

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DevicesChanged)


class PairingRequested(Message):
    """Another device asks to pair with this one: shown wherever the person is."""

    bubble = False

    def __init__(self, request) -> None:  # app.services.devices.PairingRequest
        super().__init__()
        self.request = request


class PairingFinished(Message):
    bubble = False

    def __init__(self, paired: bool, text: str) -> None:
        super().__init__()
        self.paired = paired
        self.text = text


class TrainProgress(Message):
    """The latest progress of the running job (app.services.train.TrainStatus)."""

    bubble = False

    def __init__(self, status) -> None:
        super().__init__()
        self.status = status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TrainProgress)


class TrainFinished(Message):
    bubble = False

    def __init__(self, ok: bool, text: str) -> None:
        super().__init__()
        self.ok = ok
        self.text = text


class TaskDone(Message):
    """A one-off job of a screen finished (export, delete, ...): `error` is empty on success."""

    bubble = False

    def __init__(self, what: str, text: str, error: str = "") -> None:
        super().__init__()
        self.what = what
        self.text = text
        self.error = error
