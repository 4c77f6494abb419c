"""Tensor and pipeline parallelism over Ray actors: the ranks may live on several machines of a Ray cluster.

Ray only places, starts, watches and ends the ranks; everything else is the mp executor's: rank 0 runs in the
engine process beside the scheduler, the ranks join the same torch.distributed groups (NCCL on CUDA, gloo on the
CPU; rank 0 listens on this node's address) and each step's plan reaches them by the same broadcast
(worker/step_broadcast), and pipeline stages pass activations point to point as under mp. Ranks 1..T x P - 1 are
RankActor actors in bundles 1..T x P - 1 of one placement group (ray_cluster.place_ranks); on CUDA an idle actor
holds bundle 0's GPU, and rank 0 uses that GPU. Bundles are packed onto as few nodes as hold them, in rank order,
so a stage's tensor-parallel ranks (consecutive ranks) share a node whenever a node holds a whole stage.

A monitor thread waits on every actor's serve call: one that ends while the engine runs (the actor died, its node
was lost, or it raised) is reported as one line naming the rank and the cause, then handed to on_failure (by
default: exit the engine process non-zero, which the supervisor sees). Nothing outlives the engine: shutdown kills
the actors and removes the placement group, and an engine that dies without it is their owner, so Ray ends both.
"""
from __future__ import annotations

import logging
import atexit
import os
import re
import threading
from typing import Callable

from engine_svc.config import EngineConfig
from engine_svc.distributed.process_group import RankSpec, free_init_method, join, leave
from engine_svc.executor.ray_cluster import connect, place_ranks, visible_index
from engine_svc.executor.ray_worker import RankActor
from engine_svc.worker.device_choice import resolve_device
from engine_svc.worker.model_runner import ModelRunner

_LOG = logging.getLogger("tandem.engine.executor")

_STOP_WAIT_S = 10.0   # a rank told to stop gets this long to leave its groups before it is killed
_MONITOR_SLICE_S = 0.25     # the monitor's longest stay inside Ray at a time
_MONITOR_JOIN_S = 15.0      # generous: on a loaded machine a thread may wait long to be scheduled


class RayExecutor:
    def __init__(self, config: EngineConfig, on_failure: Callable[[str], None] | None = None) -> None:
        device = resolve_device(config.device)
        size = config.world_size
        self._stopping = False
        self.on_failure = on_failure or self._exit_engine   # the engine service replaces it (NOT_SERVING first)
        self.actors: list = []                 # every actor placed (on CUDA the first holds rank 0's GPU)
        self.workers: list = []                # ranks 1..T x P - 1, in order
        self.specs: list[RankSpec] = []        # the workers' specs, in order
        self.where: list[tuple[str, int, list]] = []   # (node, pid, GPU ids) of each worker
        self._serving: dict = {}               # serve call -> rank
        self._monitor_thread: threading.Thread | None = None
        self._released = threading.Event()     # set before leaving Ray: the monitor stops calling into it
        self.placement = None
        self._joined_ray = connect(config.ray_address)   # first: it prepares the environment Ray is imported in
        import ray

        # Registered after ray.init, so it runs before Ray's own exit hook ends the actors: an ending, not a failure.
        atexit.register(self._mark_stopping)
        try:
            self.placement = place_ranks(size, device.type, config.distributed_timeout_s)
            driver_gpu = self._start_actors(size, device.type == "cuda")
            here = ray.util.get_node_ip_address()
            _LOG.info("ranks placed by Ray: " + ", ".join(
                [f"0 on {here} (the engine, pid {os.getpid()})"]
                + [f"{rank} on {node} (pid {pid})" for rank, (node, pid, _) in enumerate(self.where, 1)]))
            init_method = free_init_method(here)
            for rank, worker in enumerate(self.workers, 1):   # Ray gives a GPU actor one device: its index 0
                spec = RankSpec(config, rank, init_method, device.type, os.getpid(),
                                None if driver_gpu is None else 0)
                self.specs.append(spec)
                self._serving[worker.serve.remote(spec)] = rank
            self._monitor_thread = threading.Thread(target=self._monitor, daemon=True, name="rank-actor-monitor")
            self._monitor_thread.start()
            spec = RankSpec(config, 0, init_method, device.type, os.getpid(), driver_gpu)
            tp, self.channel = join(spec)
            self.driver = ModelRunner(config, tp=tp, channel=self.channel, pp=spec.stage)
        except BaseException:
            self._release()
            raise
        self.launch = self.driver.launch
        self.execute = self.driver.execute
        self.forward_logits = self.driver.forward_logits

    def _start_actors(self, size: int, cuda: bool) -> int | None:
        """Starts an actor in each bundle that needs one and records where the workers run; returns rank 0's CUDA
        device (the GPU Ray gave the actor holding bundle 0), or None on the CPU."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        per_rank = dict(num_gpus=1, num_cpus=0) if cuda else dict(num_cpus=1)
        actor_class = ray.remote(RankActor)
        self.actors = [actor_class.options(**per_rank, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=bundle)).remote()
            for bundle in range(0 if cuda else 1, size)]
        self.workers = self.actors[1:] if cuda else self.actors
        calls = [actor.where.remote() for actor in self.actors]   # each answers once its process is up
        where = []
        for rank, call in enumerate(calls, 0 if cuda else 1):
            try:
                where.append(ray.get(call))
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"the Ray actor of tensor-parallel rank {rank} did not start: "
                                   f"{_actor_death(e)}") from None
        self.where = where[1:] if cuda else where
        return visible_index(where[0][2][0]) if cuda else None

    def _monitor(self) -> None:
        import ray

        pending = list(self._serving)
        while pending and not self._released.is_set():
            try:
                # In slices, so that _stop_monitor can take it out of Ray before Ray shuts down.
                done, pending = ray.wait(pending, num_returns=1, timeout=_MONITOR_SLICE_S)
            except Exception:   # noqa: BLE001 - Ray is going away: only an ending can do that
                return
            for ref in done:
                if self._stopping:
                    continue
                rank = self._serving[ref]
                what = self._what_ended(ref, rank)
                if self._stopping:
                    continue
                self._stopping = True
                self.on_failure(f"{self.specs[rank - 1].describe()} {what}; the engine stops")

    def _what_ended(self, ref, rank: int) -> str:
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:   # the rank raised: its own exception
            cause = e.cause if e.cause is not None else e
            return f"failed ({type(cause).__name__}: {_one_line(str(cause))})"
        except ray.exceptions.RayActorError as e:  # its process or node is gone
            node, pid, _ = self.where[rank - 1] if rank <= len(self.where) else ("?", "?", [])
            return f"died (Ray actor on {node}, pid {pid}: {_actor_death(e)})"
        except Exception as e:   # noqa: BLE001 - whatever else Ray raises is reported, never swallowed
            return f"failed ({type(e).__name__}: {_one_line(str(e))})"
        return "stopped serving before the engine told it to"

    def _mark_stopping(self) -> None:
        """At interpreter exit, before Ray's own exit hook shuts Ray down."""
        self._stopping = True
        self._stop_monitor()

    def _stop_monitor(self) -> None:
        """Returns once the monitor thread is out of Ray (or after _MONITOR_JOIN_S): a thread inside Ray's core while
        ray.shutdown() tears it down can crash the process."""
        self._released.set()
        monitor = self._monitor_thread
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=_MONITOR_JOIN_S)

    def _exit_engine(self, message: str) -> None:
        _LOG.error(message)
        if self._joined_ray:   # a local Ray this engine started goes with it (a cluster's is only left)
            try:
                import ray
                ray.shutdown()
            except Exception:   # noqa: BLE001 - exiting anyway
                pass
        os._exit(1)

    def kill_workers(self) -> None:
        """Kills every actor at once, with no collective and no wait (for when the ranks are out of step)."""
        self._stopping = True
        self._serving = {}
        self._release()

    def shutdown(self) -> None:
        if not self._stopping:
            self._stopping = True
            try:
                self.channel.send_stop()
            finally:
                self._release()
            return
        self._release()

    def _release(self) -> None:
        """Ends the ranks, frees their bundles, and leaves Ray if the engine joined it. Safe to call twice."""
        import ray
        from ray.util.placement_group import remove_placement_group

        self._stopping = True
        if self._serving:   # told to stop, the ranks leave their groups and their serve calls return
            ray.wait(list(self._serving), num_returns=len(self._serving), timeout=_STOP_WAIT_S)
        self._stop_monitor()
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.workers, self._serving = [], [], {}
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
        leave()
        if self._joined_ray:
            self._joined_ray = False
            ray.shutdown()


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _actor_death(error) -> str:
    """The cause in Ray's (long, multi-line) actor-death message: the exception of a failed creation, the worker's
    exit detail, or the reason given."""
    text = str(getattr(error, "error_msg", None) or error)
    if "creation task" in text:   # a traceback: its last line is the exception
        return _one_line(text.strip().splitlines()[-1])
    flat = " ".join(text.split())
    for pattern in (r"Worker exit detail: (.+?)\.(?: |$)", r"The actor (?:is dead|died) because (.+?)\.(?: |$)"):
        m = re.search(pattern, flat)
        if m:
            return _one_line(m.group(1))
    return _one_line(flat)
