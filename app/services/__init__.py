"""The headless service layer of the app: what the screens call, built once, passed in.

Nothing under app/services imports Textual (tests/test_import_rules.py checks it): the same
services serve the app, its tests and any other front end. Values that cross into the screens
are dataclasses. Services block; the screens call them from worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.services.chat import ChatService
from app.services.devices import DevicesService
from app.services.models import ModelsService
from app.services.train import TrainService
from core.config import Config


@dataclass
class Services:
    config: Config
    chat: ChatService
    models: ModelsService
    devices: DevicesService
    train: TrainService

    def close(self) -> None:
        self.train.stop_all()    # each job stops at its next step and keeps its checkpoint
        self.models.close()      # a download stops; its finished files stay in the cache
        self.chat.close()
        self.devices.stop()


def build_services(config: Config | None = None, devices: DevicesService | None = None) -> Services:
    """The services for this process, on the config and history of `hearth_paths()`.

    Nothing heavy happens here (no model, no network): the app starts those in workers.
    """
    from core.config import load_config
    from serving.history import History

    config = config or load_config()
    devices = devices or DevicesService()
    chat = ChatService(History(), config)
    return Services(
        config=config,
        chat=chat,
        models=ModelsService(config, on_active=chat.use_model),
        devices=devices,
        train=TrainService(devices=devices),
    )
