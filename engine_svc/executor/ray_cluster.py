"""The engine's side of a Ray cluster: joining it, and reserving one bundle per tensor-parallel rank.

The bundles form one placement group, packed onto as few nodes as hold them; bundle 0 is pinned to this node
(Ray's `node:<ip>` resource) and stands for rank 0, which runs in the engine process: reserving it keeps Ray from
handing the engine's GPU (or CPU) to another actor. Every function imports Ray itself: this module is imported only
when the Ray executor is chosen.
"""
from __future__ import annotations

import logging
import os
import time

_LOG = logging.getLogger("tandem.engine.executor")

_WAIT_SLICE_S = 10.0   # a placement still pending is reported this often


def connect(address: str | None) -> bool:
    """Joins this process to a Ray cluster; returns whether it did (the engine then leaves it, with ray.shutdown,
    which also stops a local Ray it started). A process already connected (a test's, an embedding program's) keeps
    its cluster. address None is Ray's own choice: $RAY_ADDRESS, else the cluster `ray start` started on this
    machine, else a new local Ray."""
    # Ray's core worker would otherwise install its own handler for SIGTERM (a stack dump, then abort), replacing the
    # engine's graceful stop; it reads this when ray is first imported.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--distributed-executor ray needs Ray: pip install 'tandem[ray]'") from e

    if ray.is_initialized():
        return False
    context = ray.init(address=address)
    _LOG.info("Ray cluster at %s: %s", context.address_info["gcs_address"], _describe(ray.cluster_resources()))
    return True


def _describe(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    nodes = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) + f" on {nodes} node(s)"


def rank_resource(device_type: str) -> str:
    """What one rank holds: a GPU on CUDA, a CPU otherwise."""
    return "GPU" if device_type == "cuda" else "CPU"


def place_ranks(size: int, device_type: str, timeout_s: float):
    """A ready placement group of `size` bundles (bundle 0 on this node). Refused at once when the cluster does not
    have `size` of the resource at all; a cluster that has them but is busy is waited on up to timeout_s."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    resource = rank_resource(device_type)
    total = ray.cluster_resources().get(resource, 0)
    if total < size:
        raise ValueError(f"the Ray cluster has {total:g} {resource}(s); {size} ranks (tensor-parallel size x "
                         f"pipeline-parallel size) need {size}, one per rank: start Ray on more nodes "
                         f"(ray start --address=HEAD:PORT)")
    here = f"node:{ray.util.get_node_ip_address()}"
    bundles = [{resource: 1.0, here: 0.001}] + [{resource: 1.0} for _ in range(size - 1)]
    group = placement_group(bundles, strategy="PACK")
    deadline = time.monotonic() + timeout_s
    while True:
        ready, _ = ray.wait([group.ready()], timeout=min(_WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
        if ready:
            return group
        if time.monotonic() >= deadline:
            remove_placement_group(group)
            raise TimeoutError(f"Ray could not place {size} ranks (1 {resource} each, rank 0 on this node) within "
                               f"{timeout_s:g} s; free: {_describe(ray.available_resources())}")
        _LOG.info("waiting for Ray to place %d ranks (1 %s each); free: %s", size, resource,
                  _describe(ray.available_resources()))


def visible_index(gpu_id) -> int:
    """The CUDA device index, in this process, of the GPU Ray assigned by id (its index among the node's GPUs, or
    among CUDA_VISIBLE_DEVICES when that is set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return int(gpu_id)
    ids = [v.strip() for v in visible.split(",")]
    if str(gpu_id) not in ids:
        raise RuntimeError(f"Ray reserved GPU {gpu_id} of this node for rank 0, but the engine sees only "
                           f"CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(str(gpu_id))
