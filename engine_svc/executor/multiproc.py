"""Tensor and pipeline parallelism over worker processes on one node.

Rank 0 lives in the engine process, the others (T x P - 1) in processes started with torch.multiprocessing's
spawn. Keeping rank 0 beside the scheduler means a step costs one broadcast of its plan and nothing else: the
driver runs its own shard in place (of the last pipeline stage), gets the gathered logits from the model's
collectives and samples them where the scheduler reads the ids, with no second hop back. (All ranks as children
would add a round trip per step for the results.)

A monitor thread waits on the workers' sentinels: a worker that exits while the engine runs is a failure, reported
as one line naming the rank and its exit status, handed to on_failure: by default, print it and exit the engine
process non-zero, which the supervisor sees; the engine service sets its own (health NOT_SERVING, its gRPC
streams ended, the other workers killed with kill_workers(), then the same line and exit). A collective on a dead
peer fails at the driver too (gloo), or after the collective timeout (--distributed-timeout-s).
"""
from __future__ import annotations

import logging
import atexit
import multiprocessing.connection
import os
import signal
import threading
from typing import Callable

import torch.multiprocessing as mp

from engine_svc.config import EngineConfig
from engine_svc.distributed.process_group import RankSpec, free_init_method, join, leave
from engine_svc.worker.device_choice import resolve_device
from engine_svc.worker.model_runner import ModelRunner
from engine_svc.worker.worker_process import run_worker

_LOG = logging.getLogger("tandem.engine.executor")


def exit_engine(message: str) -> None:
    _LOG.error(message)
    os._exit(1)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, on_failure: Callable[[str], None] = exit_engine) -> None:
        device = resolve_device(config.device)
        init_method = free_init_method()
        ctx = mp.get_context("spawn")
        self._stopping = False
        self.on_failure = on_failure
        self.workers = []
        self.specs = [RankSpec(config, rank, init_method, device.type, os.getpid())
                      for rank in range(1, config.world_size)]
        for spec in self.specs:
            p = ctx.Process(target=run_worker, args=(spec,), daemon=True, name=f"tandem-rank{spec.rank}")
            p.start()
            self.workers.append(p)
        threading.Thread(target=self._monitor, daemon=True, name="worker-monitor").start()
        # At interpreter exit multiprocessing terminates the (daemon) workers: an ending, not a failure.
        atexit.register(self._mark_stopping)
        try:
            spec = RankSpec(config, 0, init_method, device.type, os.getpid())
            tp, self.channel = join(spec)
            self.driver = ModelRunner(config, tp=tp, channel=self.channel, pp=spec.stage)
        except BaseException:
            self._stop_workers()
            raise
        self.launch = self.driver.launch
        self.execute = self.driver.execute
        self.forward_logits = self.driver.forward_logits

    def _monitor(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.workers, 1)}
        while sentinels:
            for s in multiprocessing.connection.wait(list(sentinels)):
                rank = sentinels.pop(s)
                if self._stopping:
                    continue
                worker = self.workers[rank - 1]
                worker.join(1)   # reaps it, so its exit status is known
                code = worker.exitcode
                cause = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                self._stopping = True
                self.on_failure(f"{self.specs[rank - 1].describe()} died ({cause}); the engine stops")

    def _mark_stopping(self) -> None:
        self._stopping = True

    def shutdown(self) -> None:
        if self._stopping:
            self._stop_workers()
            return
        self._stopping = True
        try:
            self.channel.send_stop()
        finally:
            self._stop_workers()

    def kill_workers(self) -> None:
        """SIGKILLs every live worker and reaps it, with no collective (for when the ranks are out of step)."""
        self._stopping = True
        for p in self.workers:
            if p.is_alive():
                p.kill()
            p.join()

    def _stop_workers(self) -> None:
        self._stopping = True
        for p in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        leave()
