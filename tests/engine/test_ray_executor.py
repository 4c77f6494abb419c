"""The Ray executor (--distributed-executor ray) on a local Ray this module starts once: tensor-parallel ranks as
Ray actors give the mp executor's logits (within 1e-4, fp32) and tokens; a killed actor makes the engine service
exit naming the rank and the cause; neither that, a SIGTERM nor a clean stop leaves an actor or a placement group.

One Ray for the module (its start-up is the cost here); the engine services of the fault tests join it by address.
A test process holds one tensor-parallel group at a time, so the engines here are built one after the other."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine_svc.config import EngineConfig, config_from_args
from engine_svc.engine import Engine
from tests.e2e.conftest import free_port
from tests.engine.family_checks import PROMPTS, engine_config, run_mixed, stepped_logits
from tests.engine.tiny_models import write_tiny_family

# As the engine does before its first `import ray`: Ray's abort-on-SIGTERM handler stays out of this process too.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
ray = pytest.importorskip("ray")

CLUSTER_CPUS = 3   # logical CPUs: one per rank of the T=3 fault test


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray (no dashboard, a small object store: the ranks pass nothing through it); its GCS address. Ray's
    first start from a fresh environment can outlast its own 30 s wait for the raylet: up to three attempts."""
    for attempt in range(3):
        try:
            ray.init(num_cpus=CLUSTER_CPUS, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
                     log_to_driver=False)
            break
        except Exception:   # noqa: BLE001 - Ray's own start-up timeout (a cold first start in a fresh venv)
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 3 K/V heads (uneven at T=2, one each at T=3) and an odd vocabulary (a padded last shard).
    return write_tiny_family(tmp_path_factory.mktemp("ray-tp"), "llama", seed=3, num_attention_heads=6,
                             num_key_value_heads=3, hidden_size=96, vocab_size=321)


def _results(engine: Engine) -> tuple[list, list, tuple]:
    with torch.no_grad():
        stepped = [(seq, logits.clone()) for seq, logits in stepped_logits(engine, PROMPTS, 6)]
    return [s for s, _ in stepped], [lg for _, lg in stepped], run_mixed(engine)


@pytest.fixture(scope="module")
def mp_results(tiny):
    engine = Engine(engine_config(tiny, tensor_parallel_size=2))
    try:
        return _results(engine)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def ray_engine(ray_cluster, tiny, mp_results):   # after mp_results: one tensor-parallel group at a time
    engine = Engine(engine_config(tiny, tensor_parallel_size=2, distributed_executor="ray"))
    yield engine
    engine.shutdown()


def test_ray_ranks_give_the_mp_executors_logits_and_tokens(ray_engine, mp_results):
    seqs, logits, mixed = mp_results
    got_seqs, got_logits, got_mixed = _results(ray_engine)
    assert got_seqs == seqs and len(seqs) == len(PROMPTS) * 6
    for a, b in zip(logits, got_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    tokens, preemptions, hits = mixed
    assert preemptions > 0 and hits > 0 and all(len(t) == 32 for t in tokens.values())
    assert got_mixed == mixed
    assert ray_engine.runner.kv_caches[0].data.shape[3] == 1   # rank 0 caches one of the 3 K/V heads


def test_shutdown_kills_the_actors_and_removes_the_placement_group(ray_engine):   # ray_engine's last user
    executor = ray_engine.executor
    group = executor.placement.id.hex()
    actors = [psutil.Process(pid) for _, pid, _ in executor.where]
    assert len(actors) == 1
    ray_engine.shutdown()
    assert _placement_state(group) == "REMOVED"   # at once: shutdown returns after removing it
    _assert_left_nothing(actors, group)


def test_pipeline_stages_as_ray_actors_give_the_same_logits_and_tokens(ray_cluster, tiny, mp_results):
    """P=2: stage 0 in a Ray actor, the last stage in the engine; after ray_engine's tests (one group at a time)."""
    engine = Engine(engine_config(tiny, pipeline_parallel_size=2, distributed_executor="ray"))
    try:
        seqs, logits, mixed = mp_results
        got_seqs, got_logits, got_mixed = _results(engine)
        assert got_seqs == seqs
        for a, b in zip(logits, got_logits, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        tokens, preemptions, hits = got_mixed
        assert tokens == mixed[0] and preemptions > 0 and hits > 0   # two batches in flight preempt differently
        assert engine.runner.layers == (1, 2) and engine.runner.peak_steps_in_flight == 2
        group = engine.executor.placement.id.hex()
        actors = [psutil.Process(pid) for _, pid, _ in engine.executor.where]
    finally:
        engine.shutdown()
    _assert_left_nothing(actors, group)


def _placement_state(group_id: str) -> str:
    return ray.util.placement_group_table()[group_id]["state"]


def test_a_cluster_too_small_is_refused_by_name(ray_cluster, tiny):
    from engine_svc.executor.ray_executor import RayExecutor

    config = engine_config(tiny, tensor_parallel_size=CLUSTER_CPUS + 1, distributed_executor="ray")
    with pytest.raises(ValueError, match=rf"the Ray cluster has {CLUSTER_CPUS} CPU\(s\); {CLUSTER_CPUS + 1} ranks "
                                         rf"\(tensor-parallel size x pipeline-parallel size\) need "
                                         rf"{CLUSTER_CPUS + 1}, one per rank"):
        RayExecutor(config)


def test_a_killed_actor_exits_the_engine_naming_the_rank_and_leaves_nothing(ray_cluster, tiny, tmp_path):
    """Three ranks; rank 1's actor is killed. The engine exits within 10 s with one line naming rank 1 and the
    cause, and Ray ends rank 2's actor and the placement group with it (the engine was their owner)."""
    proc, log, actors, group = _start_engine_service(ray_cluster, tiny, tmp_path, ranks=3)
    victim = actors[0].pid
    try:
        actors[0].kill()
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the engine did not exit within 10 s of an actor's death:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0
    reports = [line for line in text.splitlines() if "tensor-parallel worker rank" in line]
    assert len(reports) == 1, text[-3000:]
    assert re.fullmatch(rf"[\d-]+ [\d:.]+ ERROR engine: tensor-parallel worker rank 1 died "
                        rf"\(Ray actor on \S+, pid {victim}: [^()]+\); the engine stops", reports[0]), reports[0]
    _assert_left_nothing(actors[1:], group)


def test_sigterm_stops_the_engine_cleanly_and_leaves_nothing(ray_cluster, tiny, tmp_path):
    """Ray's own SIGTERM handler (a stack dump, then abort) must not replace the engine's graceful stop."""
    proc, log, actors, group = _start_engine_service(ray_cluster, tiny, tmp_path, ranks=2)
    proc.terminate()
    try:
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM received" not in log.read_text()
    _assert_left_nothing(actors, group)


_PLACED = re.compile(r"(\d+) on \S+ \(pid (\d+)\)")


def _start_engine_service(address: str, model: Path, tmp_path: Path, ranks: int):
    """`python -m engine_svc` with --distributed-executor ray, joined to the module's Ray by --ray-address; once it
    listens: (process, log, its actors in rank order, its placement group's id). The actors' pids come from the
    engine's line naming where Ray placed each rank."""
    log = tmp_path / "engine.log"
    groups_before = set(ray.util.placement_group_table())
    cmd = [sys.executable, "-m", "engine_svc", "--model", str(model), "--device", "cpu", "--dtype", "float32",
           "--num-kv-blocks", "32", "--tensor-parallel-size", str(ranks), "--distributed-executor", "ray",
           "--ray-address", address, "--port", str(free_port())]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while "engine: listening on" not in (text := log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the engine did not come up:\n{text[-3000:]}")
        time.sleep(0.3)
    (placed,) = [line for line in text.splitlines() if "ranks placed by Ray" in line]
    by_rank = {int(r): int(pid) for r, pid in _PLACED.findall(placed)}
    assert sorted(by_rank) == list(range(1, ranks)), placed
    (group,) = set(ray.util.placement_group_table()) - groups_before
    return proc, log, [psutil.Process(by_rank[r]) for r in sorted(by_rank)], group


def _assert_left_nothing(actors: list[psutil.Process], group: str) -> None:
    _, alive = psutil.wait_procs(actors, timeout=10)
    assert not alive, "rank actors outlived their engine"
    deadline = time.monotonic() + 10
    while _placement_state(group) != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _placement_state(group) == "REMOVED"


def test_options_parse_and_ray_address_needs_the_ray_executor():
    cfg = config_from_args(["--model", "m", "--tensor-parallel-size", "2", "--distributed-executor", "ray",
                            "--ray-address", "10.0.0.1:6379"])
    assert (cfg.distributed_executor, cfg.ray_address) == ("ray", "10.0.0.1:6379")
    assert config_from_args(["--model", "m", "--distributed-executor", "ray"]).ray_address is None
    with pytest.raises(ValueError, match="ray_address needs distributed_executor ray"):
        EngineConfig(model="m", ray_address="auto")
    with pytest.raises(ValueError, match=r"Ray Client \(ray://\) is not supported"):
        EngineConfig(model="m", distributed_executor="ray", ray_address="ray://10.0.0.1:10001")


@pytest.mark.parametrize("message, cause", [
    # Ray 2.60's words for an actor whose process was SIGKILLed, one that failed to start, one ray.kill ended.
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: RankActor\n\tpid: 42\nThe actor is "
     "dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
     "unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) ...",
     "Worker unexpectedly exits with a connection error code 2"),
    ("The actor died because of an error raised in its creation task, ray::RankActor.__init__() (pid=7)\n  File "
     "\"x.py\", line 1, in <module>\nModuleNotFoundError: No module named 'engine_svc'",
     "ModuleNotFoundError: No module named 'engine_svc'"),
    ("The actor died unexpectedly.\nThe actor is dead because it was killed by `ray.kill`.",
     "it was killed by `ray.kill`"),
])
def test_ray_actor_deaths_are_told_in_one_line(message, cause):
    from engine_svc.executor.ray_executor import _actor_death

    assert _actor_death(ray.exceptions.RayActorError(error_msg=message)) == cause


def test_without_ray_installed_the_executor_says_what_to_install(monkeypatch):
    from engine_svc.executor.ray_cluster import connect

    monkeypatch.setitem(sys.modules, "ray", None)   # what `import ray` meets when Ray is not installed
    with pytest.raises(RuntimeError, match=r"--distributed-executor ray needs Ray: pip install 'tandem\[ray\]'"):
        connect(None)


def test_only_the_ray_executor_imports_ray():
    """Ray is heavy and optional: no engine module imports it, or the Ray executor's modules, at import time; the
    Ray modules import it inside the functions that run when --distributed-executor ray is chosen."""
    root = Path(__file__).resolve().parents[2] / "engine_svc"
    ray_modules = {"ray_cluster", "ray_worker", "ray_executor"}
    for path in root.rglob("*.py"):
        for name in _import_time_imports(ast.parse(path.read_text())):
            assert name != "ray" and not name.startswith("ray."), f"{path} imports {name} at import time"
            if name.rsplit(".", 1)[-1] in ray_modules:
                assert path.stem in ray_modules, f"{path} imports {name} at import time"


def _import_time_imports(tree: ast.AST):
    """Modules a file imports when it is imported (function bodies run later; class bodies run then)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module or ""
            yield from (f"{node.module}.{a.name}" for a in node.names)
        else:
            yield from _import_time_imports(node)
