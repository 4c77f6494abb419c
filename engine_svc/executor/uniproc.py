"""Today's path: the model runner in the engine process, called directly."""
from __future__ import annotations

from engine_svc.config import EngineConfig
from engine_svc.worker.model_runner import ModelRunner


class UniProcExecutor:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.driver = runner or ModelRunner(config)
        self.launch = self.driver.launch
        self.execute = self.driver.execute
        self.forward_logits = self.driver.forward_logits

    def shutdown(self) -> None:
        pass
