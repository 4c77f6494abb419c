"""A worker rank (1..T x P - 1: a tensor-parallel rank of a pipeline stage) as a Ray actor. The executor wraps RankActor with ray.remote() when it places
the ranks; this module imports no Ray at import time, and the actor's process imports it by name (Tandem must be
installed on every node of the cluster, as for the engine)."""
from __future__ import annotations

import os

from engine_svc.distributed.process_group import RankSpec, join, leave
from protos.service_logging import setup_logging


class RankActor:
    def where(self) -> tuple[str, int, list]:
        """(node address, pid, the GPU ids Ray gave this actor): for the engine's failure reports and its GPU."""
        import ray
        return ray.util.get_node_ip_address(), os.getpid(), list(ray.get_gpu_ids())

    def serve(self, spec: RankSpec) -> None:
        """Joins the process groups, builds this rank's shard and runs the plans the driver broadcasts until it
        stops; returns then. An exception ends the call with it, which the driver's monitor reports."""
        from engine_svc.worker.model_runner import ModelRunner

        setup_logging("engine", spec.config.log_level, spec.config.log_format)
        tp, channel = join(spec)
        try:
            ModelRunner(spec.config, tp=tp, channel=channel, pp=spec.stage).serve_plans()
        finally:
            leave()
