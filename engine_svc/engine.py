"""The engine: scheduler + model runner, one step per call. The gRPC service drives it from its own thread
(engine_loop); tests and offline benchmarks drive it directly.

With asynchronous scheduling each step() launches step k on the device and only then reads step k-1's sampled ids
and applies them, so scheduling, input preparation and output handling overlap the device's work; outputs come one
call later. A step whose requests need every id on the host before sampling (a beam's next round; penalties do
not, their counts stay on the device) first waits for the step in flight. So does a step with a structured-output
request: its grammar's mask is made from every token it has output.

With pipeline parallelism (P stages) the engine keeps up to P batches in flight instead: each step() launches
batches while fewer than P are in flight and the scheduler finds work outside them (a request is in at most one
batch in flight, and each batch takes about 1/P of the requests), then finishes the oldest, whose ids come from
the last stage's sampler. While the driver runs the last stage of one batch, the earlier stages run the later
ones.

Speculative decoding (engine_svc.spec, --speculative-method): the scheduler asks the proposer for tokens for each
decoding request that speculates, and the runner verifies them in the same step. A step with such a request first
waits for the step in flight, as for penalties: proposals are made from real ids, and a verify row's new tokens
(one or more) are known before its request is scheduled again. Under asynchronous scheduling this costs the
overlap for those steps; it is the simplest correct choice.

Structured output (engine_svc.structured): a request's grammar compiles on a thread pool while the request waits
in the scheduler (which only sees a ready predicate); a grammar that does not compile rejects its request.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace

from engine_svc.adapters import AdapterInfoLike, AdapterRegistry, AdapterStatus
from engine_svc.config import EngineConfig
from engine_svc.core.group_policy import chooses_tokens
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams
from engine_svc.core.scheduler import AdmissionError, RequestOutput, Scheduler, SchedulerConfig, SchedulerOutput
from engine_svc.executor import make_executor
from engine_svc.spec.ngram_proposer import NgramProposer
from engine_svc.structured.compiler import GrammarError
from engine_svc.structured.manager import StructuredOutputs, model_vocabulary
from engine_svc.worker.model_runner import LaunchedStep, PipelinedStep

_LOG = logging.getLogger("tandem.engine")


class Engine:
    def __init__(self, config: EngineConfig, executor=None) -> None:
        self.executor = executor or make_executor(config)
        self.runner = self.executor.driver   # rank 0's runner: the model config, device, LoRA manager, KV size
        self.config = config if executor else self.runner.config
        self.model_cfg = self.runner.model_cfg
        # The runner owns the LoRA manager (and makes each step's adapters resident) when LoRA is enabled.
        self.adapters = AdapterRegistry(self.runner.lora)
        num_blocks = min(self.config.num_kv_blocks or self.runner.num_blocks, self.runner.num_blocks)
        self.kv = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching,
                                 num_host_blocks=self.runner.host_blocks_for(self.config.kv_offload_gb))
        self.pipeline_depth = self.config.pipeline_parallel_size   # batches in flight at most
        vocab = self.model_cfg.vocab_size
        self.structured = StructuredOutputs(
            model_vocabulary(self.config.model, vocab, tuple(self.model_cfg.eos_token_ids)), vocab,
            self.config.max_num_seqs * self.pipeline_depth)
        self.scheduler = Scheduler(
            # Pipelined, max_num_seqs bounds each of the P batches in flight (vLLM's virtual engines, each with its
            # own max_num_seqs): P times as many requests run.
            SchedulerConfig(max_num_seqs=self.config.max_num_seqs * self.pipeline_depth,
                            max_num_batched_tokens=self.config.max_num_batched_tokens,
                            max_model_len=self.config.max_model_len,
                            max_waiting=self.config.max_waiting,
                            enable_chunked_prefill=self.config.enable_chunked_prefill,
                            max_loras=self.config.max_loras if self.adapters.enabled else None,
                            num_speculative_tokens=self.config.num_speculative_tokens
                            if self.config.speculative_method else 0),
            self.kv, frozenset(self.model_cfg.eos_token_ids), is_ready=self.structured.is_ready,
            proposer=self._make_proposer())
        self.num_steps = 0
        on = self.config.async_scheduling
        # Pipelined, the batches in flight take the place of asynchronous scheduling's one step ahead.
        self.async_scheduling = (self.runner.device.type == "cuda" if on is None else on) and self.pipeline_depth == 1
        self._in_flight: deque[tuple[SchedulerOutput, LaunchedStep | PipelinedStep]] = deque()   # oldest first
        self._stepping: list[SchedulerOutput] = []   # what the current step scheduled (blamed if it fails)
        self._in_executor = False                    # the current step is inside the executor (the model)
        for name, path in self.config.lora_modules:   # --lora NAME=PATH; a shared runner may have them already
            if not (self.adapters.enabled and self.adapters.manager.has(name)):
                self.adapters.load(name, path)

    def _make_proposer(self):
        """The proposer of --speculative-method, timed into the scheduler's spec_stats; None when off."""
        c = self.config
        self.draft = None   # the draft model's proposer: the runner takes its proposal distributions
        if c.speculative_method is None:
            return None
        if c.speculative_method == "draft":
            from engine_svc.spec.draft_proposer import draft_proposer_for
            self.draft = draft_proposer_for(self.runner, c)
            return _Timed(self.draft, self)
        return _Timed(NgramProposer(c.ngram_min, c.ngram_max), self)

    @property
    def spec_stats(self):
        return self.scheduler.spec_stats

    def with_scheduling(self, **changes) -> "Engine":
        """A fresh engine (empty queues and prefix cache) over this one's loaded model and KV tensors, with other
        scheduling settings: prefix caching, chunking, token budget, max_num_seqs, or fewer KV blocks. For
        benchmarks and tests that compare settings without loading the model again."""
        if changes.keys() - _SCHEDULING_FIELDS:
            raise ValueError(f"only scheduling settings can change: {sorted(_SCHEDULING_FIELDS)}")
        return Engine(replace(self.runner.config, **changes), self.executor)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.model_cfg.name

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str = "", adapter: str | None = None) -> None:
        """adapter: a loaded LoRA adapter's name, or None for the base model; UnknownAdapter (an AdmissionError)
        when it is not loaded or is being unloaded."""
        if adapter is not None:
            self.adapters.check_servable(adapter)
        if params.structured_output is not None:
            try:
                self.structured.start(request_id, params.structured_output)
            except GrammarError as e:   # known not to compile: refused at once, like any invalid request
                raise AdmissionError(str(e), no_capacity=False) from None
        self.scheduler.add_request(request_id, prompt_token_ids, params, priority, cache_salt, adapter)

    # --- LoRA adapters (see engine_svc.adapters for the unload policy) ---------------------------------------------

    def load_adapter(self, name: str, path: str) -> AdapterInfoLike:
        return self.adapters.load(name, path)

    def begin_unload_adapter(self, name: str) -> None:
        """New requests on name are refused from now on; drop_drained_adapters() drops it once it is unused."""
        self.adapters.begin_unload(name, self.scheduler.requests_by_adapter().get(name, 0))

    def drop_drained_adapters(self) -> list[tuple[str, int]]:
        """Drops the unloading adapters that no unfinished request and no step in flight uses any more."""
        in_use = set(self.scheduler.requests_by_adapter())
        for out, _ in self._in_flight:
            in_use |= out.adapters
        return self.adapters.drop_drained(in_use)

    def adapter_statuses(self) -> list[AdapterStatus]:
        return self.adapters.statuses(self.scheduler.requests_by_adapter())

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def is_live(self, request_id: str) -> bool:
        return self.scheduler.is_live(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._in_flight)

    def waits_for_grammars(self) -> bool:
        """There is work, but only requests whose grammar still compiles: a step would do nothing. The compiler
        calls structured.wake when one ends."""
        return (not self._in_flight and not self.scheduler.running
                and self.structured.waits_for(self.scheduler.waiting))

    def check_integrity(self) -> list[str]:
        """Broken KV-cache invariants (empty when sound); when idle, no block may be in use."""
        return self.scheduler.check_integrity()

    def host_kv_stats(self) -> tuple[int, int, int, int, int]:
        """The host KV tier's (blocks, blocks used, hits in blocks, bytes offloaded, bytes loaded back); zeros
        without one."""
        host = self.kv.host
        if host is None:
            return 0, 0, 0, 0, 0
        per_block = self.runner.host_kv.bytes_per_block(self.runner.kv_caches)
        return (host.num_slots, host.num_used, host.stats.loaded_blocks, host.stats.offloaded_blocks * per_block,
                host.stats.loaded_blocks * per_block)

    def step(self) -> list[RequestOutput]:
        """One engine step. An exception in a request's own results fails that request alone (the scheduler); one
        raised by the step as a whole (scheduling, the model, sampling) fails the requests that step carried, and
        the engine goes on with the others."""
        self._stepping = []
        self._in_executor = False
        # The driver masks the constrained rows when it samples, with this engine's grammars (engines made by
        # with_scheduling share the runner).
        self.runner.structured = self.structured
        self.runner.draft = self.draft
        t0 = time.perf_counter()
        try:
            outputs = self._grammar_errors()
            outputs += self._step()
            self.structured.forget(self.scheduler.is_live, self.scheduler.requests)
            return outputs
        except Exception as e:  # noqa: BLE001 - see the docstring: the engine must outlive any one request
            if self._in_executor and self.config.world_size > 1:
                raise   # a rank that raised mid-step leaves the others inside a collective: only a restart is safe
            _LOG.exception("an engine step failed")
            return self._fail_step(f"{type(e).__name__}: {e}")
        finally:
            if self.scheduler.proposer is not None:
                self.spec_stats.step_time_s += time.perf_counter() - t0

    def _step(self) -> list[RequestOutput]:
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if not self.async_scheduling:
            out = self.scheduler.schedule()
            self._stepping.append(out)
            if out.is_empty:
                return []
            self._in_executor = True
            result = self.executor.execute(out)
            self._in_executor = False
            self.num_steps += 1
            return self.scheduler.update(out, result.sampled, result.logprobs, result.prompt_logprobs, result.runs)
        outputs = []
        if self._in_flight and self._needs_real_ids():
            outputs = self._finish_in_flight()
        out = self.scheduler.schedule()
        self._stepping.append(out)
        launched = None
        if not out.is_empty:
            self._in_executor = True
            launched = self.executor.launch(out)
            self._in_executor = False
            self.scheduler.mark_in_flight(out)
            self.num_steps += 1
        if self._in_flight:
            outputs = self._finish_in_flight()   # while the device runs the step just launched
        if launched is not None:
            self._in_flight.append((out, launched))
        return outputs

    def _grammar_errors(self) -> list[RequestOutput]:
        """Ends the requests whose grammar did not compile (rejected) or whose output broke it (failed)."""
        outputs = []
        failed, broken = self.structured.take_errors()
        for rid, e in failed:
            if isinstance(e, GrammarError):
                outputs += self.scheduler.reject(rid, str(e))
            else:
                outputs += self.scheduler.fail(rid, f"compiling its grammar failed: {type(e).__name__}: {e}")
        for rid, reason in broken:
            outputs += self.scheduler.fail(rid, f"structured output: {reason}")
        return outputs

    def _step_pipelined(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while len(self._in_flight) < self.pipeline_depth:
            out = self.scheduler.schedule(self._in_flight_ids(), self._batch_rows())
            self._stepping.append(out)
            if out.is_empty:
                break
            outputs += self._finish_for_adapters(out)
            self._in_executor = True
            launched = self.executor.launch(out)
            self._in_executor = False
            self._in_flight.append((out, launched))
            self.num_steps += 1
        return outputs + (self._finish_in_flight() if self._in_flight else [])

    def _finish_for_adapters(self, out: SchedulerOutput) -> list[RequestOutput]:
        """The driver writes a batch's adapter slots before the last stage of the batches in flight has run, so
        their adapters and out's must fit the max_loras slots together: finishes the oldest until they do (the
        scheduler bounds the running requests' adapters, but a batch in flight may hold one whose requests ended)."""
        outputs: list[RequestOutput] = []
        while self.adapters.enabled and self._in_flight and len(
                out.adapters.union(*(o.adapters for o, _ in self._in_flight))) > self.config.max_loras:
            outputs += self._finish_in_flight()
        return outputs

    def _in_flight_ids(self) -> frozenset[str]:
        return frozenset(s.request.request_id for out, _ in self._in_flight for s in out.scheduled)

    def _batch_rows(self) -> int:
        """A batch's share of the requests, so that they spread over the P batches in flight (vLLM's virtual
        engines split them the same way, by assignment), and at most max_num_seqs."""
        active = len(self.scheduler.running) + len(self.scheduler.waiting)
        return max(1, min(self.config.max_num_seqs, -(-active // self.pipeline_depth)))

    def _fail_step(self, error: str) -> list[RequestOutput]:
        """Fails every API request of the failed step (and of the step in flight, whose results are lost with it).
        When the failure came before any step was scheduled, no request can be blamed, so all of them fail: the
        scheduler's state may be half-changed, and a clean slate keeps the KV cache sound."""
        outs = list(self._stepping)
        if self.pipeline_depth > 1:
            # Every stage runs the batches in flight whatever happens here; the driver runs their last stage too
            # (results dropped), so that the ranks stay in step. An exception doing so escapes: fatal, as any other
            # inside the executor.
            for _, launched in self._in_flight:
                launched.wait()
        outs += [out for out, _ in self._in_flight]
        self._in_flight.clear()
        self.kv.abandon_copies([out.kv_copies for out in outs])   # their host KV tier copies may not have run
        if self._stepping:
            ids = {s.request.external_id for o in outs for s in o.scheduled}
        else:
            ids = {r.external_id for r in self.scheduler.requests.values()} | set(self.scheduler.groups)
        failed = []
        for rid in sorted(ids):
            failed += self.scheduler.fail(rid, error)
        return failed

    def _finish_in_flight(self) -> list[RequestOutput]:
        out, launched = self._in_flight.popleft()
        self._in_executor = True
        result = launched.wait()
        self._in_executor = False
        return self.scheduler.update(out, result.sampled, result.logprobs, result.prompt_logprobs, result.runs)

    def _needs_real_ids(self) -> bool:
        # Penalty counts live on the device, but one that fell behind is refilled from the host's ids; a group that
        # chooses its members' tokens (beam search) does so from the last step's results; a grammar's mask follows
        # every output token; proposals are made from real ids, and a verify row's tokens must be known before its
        # request is scheduled again.
        s = self.scheduler
        return any((r.params.uses_penalties and self.runner.penalties.needs_real_ids(r)) or chooses_tokens(r)
                   or r.params.structured_output is not None or s.spec.speculates(r) for r in s.running)

    def shutdown(self) -> None:
        """Stops the executor's workers (none in a single process) and the grammar compilers."""
        self.structured.shutdown()
        self.executor.shutdown()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Runs prompts to completion together; returns each one's output ids."""
        ids = [f"offline-{self.num_steps}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            if self.waits_for_grammars():
                self.structured.wait(timeout=0.05)
            for o in self.step():
                outputs[o.request_id].extend(o.new_token_ids)
        return [outputs[rid] for rid in ids]


_SCHEDULING_FIELDS = frozenset({"enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens",
                                "async_scheduling", "max_num_seqs", "max_waiting", "num_kv_blocks", "kv_offload_gb",
                                "speculative_method", "num_speculative_tokens", "draft_model", "ngram_min",
                                "ngram_max"})


class _Timed:
    """A proposer whose time goes into the engine's spec_stats.draft_time_s."""

    def __init__(self, proposer, engine: Engine) -> None:
        self.proposer, self.engine = proposer, engine

    def propose(self, rows):
        t0 = time.perf_counter()
        try:
            return self.proposer.propose(rows)
        finally:
            self.engine.spec_stats.draft_time_s += time.perf_counter() - t0
