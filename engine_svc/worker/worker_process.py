"""A worker process (ranks 1..T x P - 1): joins the process groups, builds its part of the model and
runs the plans the driver broadcasts until told to stop. It never outlives the engine: a watchdog thread exits it
when its parent is gone (a SIGKILLed engine runs no clean-up), and any failure prints one line naming the rank and
exits non-zero, which the driver's monitor turns into the engine's own failure."""
from __future__ import annotations

import logging
import os
import threading
import time

from engine_svc.distributed.process_group import RankSpec, join, leave
from protos.service_logging import setup_logging

_LOG = logging.getLogger("tandem.engine.worker")


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def run_worker(spec: RankSpec) -> None:
    setup_logging("engine", spec.config.log_level, spec.config.log_format)
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True,
                     name="parent-watchdog").start()
    try:
        from engine_svc.worker.model_runner import ModelRunner
        tp, channel = join(spec)
        runner = ModelRunner(spec.config, tp=tp, channel=channel, pp=spec.stage)
        runner.serve_plans()
        leave()
    except BaseException as e:   # noqa: BLE001 - every failure must reach the driver as this process's exit
        _LOG.error("%s failed: %s: %s", spec.describe(), type(e).__name__, e)
        os._exit(1)
