"""Turns a scheduled batch into tensors, runs the model over the paged KV cache and samples on the device.

Under tensor parallelism every rank has a runner over its shard of the model. The driver's (rank 0, in the engine
process) turns the scheduler's output into a StepPlan, broadcasts it (step_broadcast) and runs it; the others run
each plan they receive (worker_process). Only the driver samples.

Under pipeline parallelism each runner holds one stage's layers (and KV caches). The driver holds the last stage:
launch() broadcasts the plan and posts the receive of the previous stage's activations, then returns; the stage's
forward and the sampling run when the engine waits for the step, by which time the earlier stages are on later
batches. The other stages run each plan as it comes and send their activations on."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch

from engine_svc.attention import AttentionMetadata, KVCache, get_backend
from engine_svc.attention.kv_cache import allocate_kv_caches, cache_dtype
from engine_svc.config import EngineConfig
from engine_svc.distributed.parallel_state import SINGLE, TensorParallel, min_over_all_ranks
from engine_svc.distributed.pipeline import SINGLE_STAGE, PendingActivations, PipelineStage, StageLink
from engine_svc.distributed.partition import model_shard, rank_local_config
from engine_svc.core.request import PLACEHOLDER
from engine_svc.core.scheduler import SchedulerOutput
from engine_svc.worker.cpu_threads import set_cpu_threads
from engine_svc.worker.device_choice import resolve_device, resolve_dtype
from engine_svc.worker.cuda_graphs import StepGraphs, runner_graphs
from engine_svc.worker.gpu_timeline import GpuTimeline
from engine_svc.worker.host_kv_pool import HostKVPool
from engine_svc.worker.weight_offload import WeightOffload, load_device
from engine_svc.worker.graph_layout import (GraphShape, RowShape, graph_batch_sizes, graph_shapes, pad_step,
                                            row_lengths, select_shape)
from engine_svc.worker.input_buffers import HostStep, InputBuffers, table_rows
from engine_svc.loader import load_model, read_model_config
from engine_svc.loader.gguf_gemv_serving import weights_plan
from engine_svc.models import model_class
from engine_svc.quant.int4_gemv_layout import apply_int4_gemv_layout
from engine_svc.worker.memory_plan import GB, MemoryPlan, activation_bytes, plan_memory, weights_bytes
from engine_svc.worker.step_broadcast import RankCall, StepChannel
from engine_svc.worker.step_plan import StepPlan
from engine_svc.worker.step_results import LaunchedStep, PinnedSlots, PromptRows, StepResult
from engine_svc.model_config import ModelConfig
from engine_svc.sampling.logprobs import token_logprobs
from engine_svc.sampling.penalty_state import PenaltyState, pool_peak_bytes
from engine_svc.lora.batch import FIELDS as LORA_FIELDS, plan_tokens
from engine_svc.sampling.sampler import SamplingBatch, apply_processors, sample_processed, to_device
from engine_svc.spec.verify import sample_with_proposals

_LOG = logging.getLogger("tandem.engine.runner")

class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig | None = None, tp: TensorParallel = SINGLE,
                 channel: StepChannel | None = None, pp: PipelineStage = SINGLE_STAGE) -> None:
        """tp: this rank's tensor-parallel group; channel: the step broadcast (the driver sends every plan on it
        before running it; None in a single process); pp: this rank's pipeline stage."""
        path = Path(config.model)
        self.tp, self.pp = tp, pp
        self.channel = channel
        self.model_cfg = model_cfg or read_model_config(path)
        if pp.size > 1 and not getattr(model_class(self.model_cfg.architecture), "supports_pipeline_parallel", False):
            raise ValueError(f"{self.model_cfg.architecture} is not supported with --pipeline-parallel-size > 1 yet")
        self.layers = pp.layer_range(self.model_cfg.num_layers)   # [start, stop) of this stage's layers
        self.link = StageLink(pp, depth=pp.size) if pp.size > 1 else None
        self.steps_in_flight = 0        # driver, P > 1: steps launched and not yet waited on
        self._adapters_in_flight: deque[set[str]] = deque()   # driver, P > 1: each such step's LoRA adapters
        self.peak_steps_in_flight = 0
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        self.max_model_len = min(config.max_model_len or self.model_cfg.max_position_embeddings,
                                 self.model_cfg.max_position_embeddings)
        if config.max_model_len and config.max_model_len > self.model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context "
                             f"{self.model_cfg.max_position_embeddings}")
        self.config = replace(config, max_model_len=self.max_model_len,
                              max_num_batched_tokens=self._token_budget(config))
        self.backend = get_backend(config.attention_backend, self.device.type)
        self._eos_token_ids = frozenset(self.model_cfg.eos_token_ids)
        self.block_size = config.block_size
        fmt = "dummy" if config.load_format == "dummy" else "weights"
        # LoRA layers multiply the base weight themselves: with adapters, a 2:4 checkpoint is served dense.
        kernels = "off" if config.enable_lora else config.sparsity_kernels
        load_on = load_device(self.device, config.quantization) if config.cpu_offload_gb else self.device
        set_cpu_threads(config, self.device)
        self.model = load_model(path, self.model_cfg, fmt, load_on, self.dtype, self.backend,
                                weights_plan(config, path, self.device, tp.size * pp.size), tp, pp, kernels,
                                self.config.max_num_batched_tokens)
        if shuffled := apply_int4_gemv_layout(self.model, config.int4_gemv_layout):
            _LOG.info("int4 GEMV: %d linears also hold the shuffled layout", shuffled)
        model_bytes = weights_bytes(self.model)
        self.weight_offload: WeightOffload | None = None   # --cpu-offload-gb
        if config.cpu_offload_gb:
            self.weight_offload = WeightOffload(self.model, self.model_cfg.num_layers, config.cpu_offload_gb,
                                                self.device)
            # Each offloaded layer's tensors point into a staging set: counted once per layer above.
            model_bytes += self.weight_offload.staging_bytes - self.weight_offload.offloaded_bytes
            _LOG.info(self.weight_offload.describe())
        self.lora = None   # a LoRAManager when LoRA is enabled; the admin RPCs load and unload through it
        if config.enable_lora:
            from engine_svc.lora.manager import LoRAManager
            mirror = None
            # The other ranks replay the driver's adapter changes; the driver is rank 0 of the last stage.
            if channel is not None and tp.rank == 0 and pp.is_last:
                mirror = lambda op, args: channel.send_call(RankCall("lora", op, args))  # noqa: E731
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                                    self.device, self.dtype, mirror=mirror)
            model_bytes += self.lora.device_bytes
        local_cfg = replace(rank_local_config(self.model_cfg, model_shard(self.model_cfg, tp.size, tp.rank)),
                            num_layers=self.layers[1] - self.layers[0])
        self.draft_proposers: dict = {}   # loaded draft models by path, shared by engines over this runner
        draft = self._load_draft()
        activations = (activation_bytes(local_cfg, self.config.max_num_batched_tokens, self._max_logits_rows(),
                                        self.dtype)
                       + pool_peak_bytes(self.config.max_num_seqs, self.model_cfg.vocab_size))
        self.plan: MemoryPlan = plan_memory(self.config, local_cfg, self.max_model_len, model_bytes,
                                            self.device, self.kv_cache_dtype, activations,
                                            draft.runner.plan if draft is not None else None)
        if self.weight_offload is not None:
            self.plan = replace(self.plan, offloaded_bytes=self.weight_offload.offloaded_bytes,
                                bus_seconds_per_step=self.weight_offload.bus_seconds_per_step)
        if tp.size * pp.size > 1:   # one scheduler, one block table for all ranks: every cache has the smallest count
            self.plan = replace(self.plan, num_blocks=min_over_all_ranks(self.plan.num_blocks))
        where = [f"tensor-parallel rank {tp.rank} of {tp.size}"] if tp.size > 1 else []
        where += [pp.describe(self.model_cfg.num_layers)] if pp.size > 1 else []
        _LOG.info(self.plan.describe() + (f" ({', '.join(where)})" if where else ""))
        shape = (2, self.plan.num_blocks, self.block_size, local_cfg.num_kv_heads, self.model_cfg.head_dim)
        self.kv_caches: list[KVCache] = allocate_kv_caches(local_cfg.num_layers, shape, self.kv_cache_dtype,
                                                           self.device)
        if draft is not None:
            draft.fit(self.num_blocks)
        self.host_kv: HostKVPool | None = None   # the host KV tier's memory (--kv-offload-gb)
        if config.kv_offload_gb:
            self.host_kv = HostKVPool(self.kv_caches, HostKVPool.slots_for(config.kv_offload_gb, self.kv_caches),
                                      pin=self.device.type == "cuda")
            _LOG.info("host KV tier: %.2f GB, %d blocks (%d B each)", self.host_kv.nbytes / GB, self.host_kv.num_slots,
                      HostKVPool.bytes_per_block(self.kv_caches))
        self._buffers: InputBuffers | None = None
        self.graphs: StepGraphs | None = None
        self._prev_sampled: torch.Tensor | None = None
        self._prev_rows: dict[str, int] = {}
        self._out_slots = PinnedSlots(self.config.max_num_seqs) if self.device.type == "cuda" else None
        self.timeline: GpuTimeline | None = None   # set by benchmarks to measure the GPU's idle gaps
        self.structured = None   # the engine's StructuredOutputs: grammar masks for the rows it constrains
        self.penalties = PenaltyState(self.model_cfg.vocab_size, self.device, self.config.max_num_seqs)   # driver's
        self.draft = None        # the engine's draft proposer (speculative decoding): its proposal distributions
        self._prev_num_sampled = 0   # a worker's count of the previous step's sampled ids (the driver holds them)
        self._buffers_for(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        if self.uses_graphs:
            self.enable_step_graphs(capture=True)

    @property
    def uses_graphs(self) -> bool:
        # The torch backend sizes its work from host copies of the lengths, which a graph cannot replay. A pipeline
        # stage's forward is not captured (its input comes from another process): P > 1 decodes eagerly.
        return (self.device.type == "cuda" and self.backend.name == "triton" and not self.config.enforce_eager
                and self.pp.size == 1 and self.weight_offload is None)

    def _load_draft(self):
        """The draft proposer of --speculative-method draft, loaded before the memory plan counts its weights and
        KV cache, with a one-block cache that fit() sizes to the plan's blocks; None without a draft."""
        if self.config.speculative_method != "draft":
            return None
        from engine_svc.spec.draft_proposer import DraftProposer
        self.draft_proposers[self.config.draft_model] = DraftProposer(self, self.config)
        return self.draft_proposers[self.config.draft_model]

    def _max_logits_rows(self) -> int:
        """The most rows a step samples from: one per sequence, 1 + K per verify row of speculative decoding."""
        c = self.config
        per_seq = 1 + (c.num_speculative_tokens if c.speculative_method else 0)
        return min(c.max_num_seqs * per_seq, c.max_num_batched_tokens)

    def resize_kv(self, num_blocks: int) -> None:
        """Re-allocates the KV caches (zeroed) with num_blocks blocks: a draft's, once the target's plan has its
        count. Only for a runner whose caches nothing else holds: no CUDA graphs, no host KV tier."""
        if self.graphs is not None or self.host_kv is not None:
            raise RuntimeError("resize_kv: CUDA graphs or the host KV tier hold the KV caches")
        layers, shape = len(self.kv_caches), self.kv_caches[0].data.shape
        self.kv_caches = []   # the old caches are freed before the new ones are allocated
        self.kv_caches = allocate_kv_caches(layers, (2, num_blocks, *shape[2:]), self.kv_cache_dtype, self.device)
        self.plan = replace(self.plan, num_blocks=num_blocks)

    def _token_budget(self, config: EngineConfig) -> int:
        if config.max_num_batched_tokens:
            return config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            return max(self.max_model_len, 8192)
        # On a CPU a step of 2048 prompt tokens already takes about a second; a larger one only lengthens the
        # decode stall of everyone else.
        return 8192 if self.device.type == "cuda" else 2048

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    def host_blocks_for(self, gb: float) -> int:
        """Blocks of the host KV tier an engine with kv_offload_gb gb uses: at most what the runner allocated."""
        if not gb:
            return 0
        if self.host_kv is None:
            raise ValueError("kv_offload_gb needs a runner started with it (its host memory is allocated once)")
        return min(self.host_kv.num_slots, HostKVPool.slots_for(gb, self.kv_caches))

    # --- inputs ----------------------------------------------------------------------------------------------------

    def _buffers_for(self, num_tokens: int, num_seqs: int) -> InputBuffers:
        b = self._buffers
        if b is None or num_tokens > b.max_tokens or num_seqs > b.max_seqs:
            # Only an engine re-made with a larger budget (Engine.with_scheduling) gets here after start-up; graphs
            # read the old tensors, so they go.
            self._buffers = b = InputBuffers(max(num_tokens, self.config.max_num_batched_tokens),
                                             max(num_seqs, self.config.max_num_seqs),
                                             -(-self.max_model_len // self.block_size), self.device,
                                             LORA_FIELDS if self.lora is not None else ())
            self.graphs = None
        return b

    def plan_step(self, out: SchedulerOutput, shape: GraphShape | None = None) -> StepPlan:
        """The step's host inputs; shape: the graph the step is padded to (graph_layout), None: eager."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        ph_dst: list[int] = []
        ph_src: list[int] = []
        bs = self.block_size
        tables = []
        prev_rows = self._prev_rows
        lora_slots = self._lora_slots(out)
        for s in out.scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            # A verify row: the last token, then the proposals (never in token_ids before they are accepted).
            ids = [req.token_ids[start], *s.spec_token_ids] if s.spec_token_ids else req.token_ids[start:start + n]
            if ids[-1] == PLACEHOLDER:   # sampled by the step still running: its id is on the device
                ph_dst.append(query_start[-1] + n - 1)
                ph_src.append(prev_rows[req.request_id])
            input_ids.extend(ids)
            positions.extend(range(start, start + n))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(blocks)
            if s.spec_token_ids:   # every position's logits: each verifies the token after it
                logits_rows.extend(range(query_start[-2], query_start[-1]))
            elif s.samples:
                logits_rows.append(query_start[-1] - 1)
        width = max(len(t) for t in tables)
        host = HostStep(input_ids, positions, slots, seq_lens, query_start, logits_rows, table_rows(tables, width),
                        width, ph_dst, ph_src)
        if shape is not None:   # the graph was captured at full table width
            host = pad_step(host, shape, self._buffers.max_blocks_per_seq)
        self.plan_lora(host, lora_slots)
        return StepPlan(host, shape, len(out.scheduled), len(logits_rows),
                        lora_active=lora_slots is not None and any(x >= 0 for x in lora_slots))

    def plan_lora(self, host: HostStep, slots: list[int] | None) -> None:
        """Fills host.extra with the LoRA token plan of the step's layout: each scheduled row's adapter slot (slots;
        None without LoRA), the base model for a graph's padding rows."""
        if slots is not None:
            host.extra = plan_tokens(slots, row_lengths(host)[:len(slots)], len(host.input_ids), self.lora.max_loras)

    def prepare(self, plan: StepPlan) -> tuple[dict[str, torch.Tensor], AttentionMetadata]:
        """Device inputs of a planned step."""
        h = plan.host
        buffers = self._buffers_for(len(h.input_ids), len(h.seq_lens))
        if self.timeline is not None:
            self.timeline.step_begins()   # the host work of the step is done; its device work starts here
        t = buffers.load(h)
        if self.lora is not None:
            self.lora.batch.bind(buffers.device_tensors, len(h.input_ids), active=plan.lora_active)
        if h.placeholder_dst:
            if self.tp.size > 1:   # only the driver sampled them: the others get them from it, on the device
                self._prev_sampled = self.tp.broadcast_from_driver(
                    self._prev_sampled if self.tp.rank == 0 else
                    torch.empty(self._prev_num_sampled, dtype=torch.int64, device=self.device))
            t["input_ids"].index_copy_(0, t["placeholder_dst"], self._prev_sampled[t["placeholder_src"]])
        query_start, seq_lens = h.query_start, h.seq_lens
        meta = AttentionMetadata(
            slot_mapping=t["slot_mapping"], block_tables=t["block_tables"], seq_lens=t["seq_lens"],
            query_start=t["query_start"],
            query_lens_cpu=[b - a for a, b in zip(query_start, query_start[1:])],
            seq_lens_cpu=seq_lens, block_size=self.block_size,
            max_seq_len=max(seq_lens[:plan.num_real]) if plan.graph is None else self.max_model_len)
        return t, meta

    def _lora_slots(self, out: SchedulerOutput) -> list[int] | None:
        """Each scheduled request's adapter slot (-1: the base model), its adapters made resident; None without
        LoRA."""
        if self.lora is None:
            if any(s.adapter for s in out.scheduled):
                raise ValueError("a request names a LoRA adapter, but LoRA is not enabled (--enable-lora)")
            return None
        slot_of = self.lora.activate(out.adapters, keep=set().union(*self._adapters_in_flight))
        return [slot_of[s.adapter] if s.adapter else -1 for s in out.scheduled]

    # --- forward ---------------------------------------------------------------------------------------------------

    def enable_step_graphs(self, capture: bool, shapes: list[GraphShape] | None = None) -> None:
        """Steps of the given shapes (default: every batch bucket up to max_num_seqs, one token per row and, with
        speculation, K + 1) run as CUDA graphs (capture=True) or, for tests on the CPU, eagerly over the same
        padded persistent buffers (capture=False)."""
        if shapes is None:
            k = self.config.num_speculative_tokens if self.config.speculative_method else 0
            shapes = graph_shapes(graph_batch_sizes(self.config.max_num_seqs), [k + 1],
                                  self.config.max_num_batched_tokens)
        buffers = self._buffers_for(max(s.num_tokens for s in shapes), max(s.batch for s in shapes))
        self.graphs = runner_graphs(self, buffers, shapes, capture)

    def _graph_shape(self, out: SchedulerOutput) -> GraphShape | None:
        if self.graphs is None:
            return None
        rows = [RowShape(s.start, s.num_new_tokens, len(s.spec_token_ids), s.samples) for s in out.scheduled]
        return select_shape(rows, self.graphs.shapes, self.max_model_len)

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Runs the model; returns float32 logits for each scheduled request that samples, in order (a verify
        row's k + 1 positions each)."""
        return self._forward(out)[0]

    def _forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, PromptRows | None]:
        if out.kv_copies:   # before the forward: it reads the loaded blocks and overwrites the offloaded ones
            self.host_kv.run(out.kv_copies)
        plan, prompt = self._plan_and_send(out)
        return self._logits(plan, prompt)

    def _plan_and_send(self, out: SchedulerOutput) -> tuple[StepPlan, PromptRows | None]:
        plan = self.plan_step(out, self._graph_shape(out))
        prompt = PromptRows.of(out)
        if prompt is not None:
            plan.prompt_rows = tuple(prompt.rows_list)
        if self.channel is not None:
            self.channel.send(plan)
        return plan, prompt

    def _logits(self, plan: StepPlan, prompt: PromptRows | None,
                intermediate: torch.Tensor | None = None) -> tuple[torch.Tensor, PromptRows | None]:
        logits, prompt_logits = self.run_plan(plan, intermediate)
        if prompt is not None:
            prompt.score(prompt_logits)
        return logits, prompt

    def receive_activations(self, plan: StepPlan) -> PendingActivations:
        """Posts the receive of the previous stage's activations for plan."""
        shape = (self.model.stage_streams, len(plan.host.input_ids), self.model_cfg.hidden_size)
        return self.link.irecv(shape, self.dtype, self.device)

    def run_plan(self, plan: StepPlan, intermediate: torch.Tensor | None = None) -> tuple[torch.Tensor | None,
                                                                                           torch.Tensor | None]:
        """The step's forward, the same on every rank of a stage: on the last stage, float32 logits of its
        sampling rows, and of its prompt rows when it scores any; on an earlier stage, (None, None) once its
        activations are sent on. intermediate: the previous stage's activations when already received."""
        t, meta = self.prepare(plan)
        if plan.graph is not None:
            return self.graphs.run(plan.graph)[:plan.num_logits], None
        inputs = (t["input_ids"], t["positions"], self.kv_caches, meta)
        if not self.pp.is_first:
            hidden = self.model(*inputs, intermediate if intermediate is not None else
                                self.receive_activations(plan).wait())
        else:
            hidden = self.model(*inputs)
        if not self.pp.is_last:
            self.link.send(hidden)
            return None, None
        prompt_logits = None
        if plan.prompt_rows:
            rows = to_device(list(plan.prompt_rows), torch.int64, self.device)
            prompt_logits = self.model.compute_logits(hidden[rows])
        return self.model.compute_logits(hidden[t["logits_rows"]]), prompt_logits

    @torch.inference_mode()
    def serve_plans(self) -> None:
        """A worker rank's loop: runs every plan the driver broadcasts until it stops."""
        while (plan := self.channel.recv()) is not None:
            if isinstance(plan, RankCall):
                getattr(self, plan.target).replay(plan.op, plan.args)
                continue
            self.run_plan(plan)
            self._prev_num_sampled = len(plan.host.logits_rows)
        if self.link is not None:
            self.link.flush()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep | PipelinedStep:
        """Queues the step's forward and sampling on the device and returns at once (on CUDA); the results are
        read with LaunchedStep.wait(). A later launch may take this step's sampled ids as its inputs.
        Under pipeline parallelism: sends the plan to every stage and returns a PipelinedStep, whose wait() runs
        the last stage and samples."""
        if self.pp.size > 1:
            plan, prompt = self._plan_and_send(out)
            self.steps_in_flight += 1
            self._adapters_in_flight.append(out.adapters)
            self.peak_steps_in_flight = max(self.peak_steps_in_flight, self.steps_in_flight)
            return PipelinedStep(self, out, plan, prompt, self.receive_activations(plan))
        return self.sample_step(out, *self._forward(out))

    def sample_step(self, out: SchedulerOutput, logits: torch.Tensor,
                    prompt: PromptRows | None) -> LaunchedStep:
        """Samples a step's logits and queues its results' copy to the host."""
        sampling = [s for s in out.scheduled if s.samples]
        step = LaunchedStep(self._out_slots)
        if sampling:
            self.sample_rows(logits, sampling, step)
        else:
            step.sampled = logits.new_empty(0, dtype=torch.int64)
        self._prev_sampled = step.sampled
        self._prev_rows = {s.request.request_id: i for i, s in enumerate(sampling)}
        if prompt is not None:
            step.prompt = prompt
        step.send_to_host()
        if self.timeline is not None:
            self.timeline.step_ends()
        return step

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.launch(out).wait()

    def sample_rows(self, logits: torch.Tensor, sampling: list, step: LaunchedStep) -> None:
        """Samples the step's sampling rows (and their logprobs, when asked) into step."""
        if any(s.spec_token_ids for s in sampling):
            v = sample_with_proposals(logits, sampling, self.model_cfg.vocab_size, self.device, self._eos_token_ids,
                                      self.structured, self.draft)
            step.sampled, step.runs, step.host_logprobs = v.sampled, v.runs, v.logprobs
            return
        params = [s.request.params for s in sampling]
        batch = SamplingBatch.build(params, [s.request.num_output_tokens for s in sampling],
                                    self.model_cfg.vocab_size, self.device,
                                    penalties=self.penalties.penalties([s.request for s in sampling]),
                                    eos_token_ids=self._eos_token_ids)
        if self.structured is not None:
            # Filled on the host while the device runs the forward, then applied there in one call.
            mask = self.structured.bitmask([s.request for s in sampling])
            if mask is not None:
                batch.grammar = (to_device(mask[0], torch.int32, self.device),
                                 to_device(mask[1], torch.int32, self.device))
        logits = apply_processors(logits, batch)
        step.sampled = sample_processed(logits, batch)
        self.penalties.count(step.sampled)
        wanted = [(p.logprobs or 0) if p.needs_logprob else None for p in params]
        if any(w is not None for w in wanted):
            step.logprobs_wanted = wanted
            step.logprobs = token_logprobs(logits, step.sampled, max(w or 0 for w in wanted))


class PipelinedStep:
    """A step whose plan every stage has (or will have) and whose earlier stages run on their own; wait() receives
    the previous stage's activations, runs the driver's last stage, samples and returns the results. The engine
    waits for steps in the order it launched them (every rank runs plans in that order)."""

    def __init__(self, runner: ModelRunner, out: SchedulerOutput, plan: StepPlan, prompt: PromptRows | None,
                 activations: PendingActivations) -> None:
        self.runner, self.out, self.plan, self.prompt, self.activations = runner, out, plan, prompt, activations

    @torch.inference_mode()
    def wait(self) -> StepResult:
        r = self.runner
        r.steps_in_flight -= 1
        r._adapters_in_flight.popleft()
        logits, prompt = r._logits(self.plan, self.prompt, self.activations.wait())
        return r.sample_step(self.out, logits, prompt).wait()
