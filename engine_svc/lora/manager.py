"""Loaded LoRA adapters (CPU copies, at most max_cpu_loras) and the max_loras device slots they run from.

load() reads and validates a PEFT directory into pinned CPU tensors already in slot layout (scaling folded into B);
activate() makes a step's adapters resident, evicting the least recently used residents the step does not need.
Writes into a slot are queued on the device's stream after the work of earlier steps, so a step still in flight
finishes reading an evicted adapter before it is overwritten.

Under tensor parallelism every rank has a manager over its shard of the model, holding its cut of each adapter
(see engine_svc.lora.layers). The driver's (rank 0, beside the scheduler) decides: its load, unload and each slot
write are mirrored, in order, to the other ranks (`mirror`, the step broadcast), which replay them before the next
step's plan arrives, so every rank's slot holds the same adapter.

Under pipeline parallelism a rank wraps only its stage's layers (`linears` is keyed by the global layer index) and
packs only their part of each adapter; the mirror reaches every stage. With several batches in flight the driver
writes a slot before the last stage of the earlier batches has run, so activate() never evicts an adapter those
batches use (`keep`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine_svc.distributed.pipeline import MissingLayer
from engine_svc.lora.batch import LoRABatch
from engine_svc.lora.layers import LoRALinear
from engine_svc.lora.peft_adapter import TARGETS, ModuleShapes, read_peft_adapter

# Our projection -> its slices' PEFT names, in the fused order.
_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRAExists(KeyError):
    """An adapter of that name is already loaded."""


class LoRANotFound(KeyError):
    """No adapter of that name is loaded."""


class LoRACapacityError(RuntimeError):
    """max_cpu_loras adapters are loaded already: unload one first."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass
class _Loaded:
    info: AdapterInfo
    # (layer, projection) -> (A [S, rank, in], B [out, rank] * scaling), zeros for slices the adapter leaves alone
    packed: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 device: torch.device, dtype: torch.dtype, *, use_kernel: bool | None = None,
                 mirror: Callable[[str, tuple], None] | None = None) -> None:
        """Wraps the q/k/v/o and gate/up/down projections of every decoder layer of a Llama-shaped model.
        use_kernel: the Triton kernels (default: on CUDA when the model runs the triton attention backend).
        mirror(op, args): sends each change of the adapters to the other tensor-parallel ranks (the driver's
        manager; None in a single process and on the other ranks, which replay())."""
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        layers = _decoder_layers(model)
        cfg = model.cfg
        if use_kernel is None:
            use_kernel = device.type == "cuda" and next(iter(layers.values())).self_attn.backend.name == "triton"
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.device, self.dtype = device, dtype
        self.batch = LoRABatch(max_loras, device, use_kernel)
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.shapes = ModuleShapes({"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                                    "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)},
                                   cfg.num_layers)
        self.mirror = mirror
        self.cuts = _rank_cuts(model)
        self.linears: dict[int, dict[str, LoRALinear]] = {}   # global layer index -> its wrapped projections
        for index, layer in layers.items():
            wrapped = {}
            for proj, slices in _PROJECTIONS.items():
                parent = layer.self_attn if proj in ("qkv_proj", "o_proj") else layer.mlp
                fan_in = self.cuts[slices[0]].in_size(self.shapes.shapes[slices[0]][0])
                sizes = [self.cuts[s].out_size(self.shapes.shapes[s][1]) for s in slices]
                wrapped[proj] = LoRALinear(getattr(parent, proj), fan_in, sizes, max_lora_rank, self.batch,
                                           device, dtype)
                setattr(parent, proj, wrapped[proj])
            self.linears[index] = wrapped
        self._loaded: dict[str, _Loaded] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()   # least recently used first

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.linears.values() for lin in d.values()
                   for t in (lin.lora_a, lin.lora_b))

    # --- the registry ----------------------------------------------------------------------------------------------

    def load(self, name: str, path: str) -> AdapterInfo:
        if not name:
            raise ValueError("a LoRA adapter needs a non-empty name")
        if name in self._loaded:
            raise LoRAExists(f"LoRA adapter {name!r} is already loaded")
        if len(self._loaded) >= self.max_cpu_loras:
            raise LoRACapacityError(f"{len(self._loaded)} LoRA adapters are loaded (max_cpu_loras); unload one first")
        adapter = read_peft_adapter(path, self.shapes, self.max_lora_rank)
        info = AdapterInfo(name, str(Path(path)), adapter.rank, adapter.alpha, adapter.target_modules)
        self._loaded[name] = _Loaded(info, self._pack(adapter))
        self._mirror("load", (name, path))
        return info

    def unload(self, name: str) -> None:
        if name not in self._loaded:
            raise LoRANotFound(f"no LoRA adapter named {name!r}")
        del self._loaded[name]
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._clear_slot(slot)
        self._mirror("unload", (name,))

    def replay(self, op: str, args: tuple) -> None:
        """Applies a change the driver's manager mirrored (another tensor-parallel rank)."""
        if op == "load":
            self.load(*args)
        elif op == "unload":
            self.unload(*args)
        elif op == "write_slot":
            name, slot = args
            for other in [n for n, s in self._resident.items() if s == slot]:
                del self._resident[other]
            self._write_slot(slot, self._loaded[name])
            self._resident[name] = slot
        else:
            raise ValueError(f"unknown LoRA change {op!r}")

    def _mirror(self, op: str, args: tuple) -> None:
        if self.mirror is not None:
            self.mirror(op, args)

    def list(self) -> list[AdapterInfo]:
        return [entry.info for entry in self._loaded.values()]

    def has(self, name: str) -> bool:
        return name in self._loaded

    def resident(self) -> dict[str, int]:
        """name -> slot of the adapters on the device, least recently used first."""
        return dict(self._resident)

    # --- slots -----------------------------------------------------------------------------------------------------

    def activate(self, names: set[str], keep: set[str] = frozenset()) -> dict[str, int]:
        """Makes names resident; keep: adapters of the batches still in flight, never evicted for them."""
        names = set(names)
        if len(names) > self.max_loras:
            raise ValueError(f"{len(names)} LoRA adapters in one step; max_loras is {self.max_loras}")
        unknown = sorted(n for n in names if n not in self._loaded)
        if unknown:
            raise LoRANotFound(f"no LoRA adapter named {unknown[0]!r}")
        for name in sorted(names & self._resident.keys()):
            self._resident.move_to_end(name)
        for name in sorted(names - self._resident.keys()):
            slot = self._take_slot(names | keep)
            self._write_slot(slot, self._loaded[name])
            self._resident[name] = slot
            self._mirror("write_slot", (name, slot))
        return {name: self._resident[name] for name in names}

    def _take_slot(self, keep: set[str]) -> int:
        free = set(range(self.max_loras)) - set(self._resident.values())
        if free:
            return min(free)
        # Exists: the scheduler runs at most max_loras adapters at once, and keep holds only running ones.
        victim = next(n for n in self._resident if n not in keep)
        return self._resident.pop(victim)

    def _write_slot(self, slot: int, entry: _Loaded) -> None:
        self._clear_slot(slot)
        rank = entry.info.rank
        for (layer, proj), (a, b) in entry.packed.items():
            lin = self.linears[layer][proj]
            lin.lora_a[slot].view(len(lin.slice_sizes), self.max_lora_rank, -1)[:, :rank].copy_(a, non_blocking=True)
            lin.lora_b[slot, :, :rank].copy_(b, non_blocking=True)
        self.batch.slot_ranks[slot] = rank

    def _clear_slot(self, slot: int) -> None:
        # Zeros (not just rank 0): the torch path reads every rank, and a new occupant may leave projections alone.
        self.batch.slot_ranks[slot] = 0
        for wrapped in self.linears.values():
            for lin in wrapped.values():
                lin.lora_a[slot].zero_()
                lin.lora_b[slot].zero_()

    def _pack(self, adapter) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        packed = {}
        for layer in self.linears:   # this pipeline stage's layers
            for proj, slices in _PROJECTIONS.items():
                if not any((layer, s) in adapter.weights for s in slices):
                    continue
                lin = self.linears[layer][proj]
                a = torch.zeros(len(slices), adapter.rank, lin.in_features, dtype=self.dtype)
                b = torch.zeros(sum(lin.slice_sizes), adapter.rank, dtype=self.dtype)
                offset = 0
                for j, (s, size) in enumerate(zip(slices, lin.slice_sizes)):
                    if (layer, s) in adapter.weights:
                        a_s, b_s = adapter.weights[(layer, s)]
                        cut = self.cuts[s]
                        a[j] = a_s.float()[:, slice(*cut.inputs)]
                        b[offset:offset + size] = b_s.float()[slice(*cut.outputs)] * adapter.scaling
                    offset += size
                packed[(layer, proj)] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
        return packed


@dataclass(frozen=True)
class _Cut:
    """The part of one PEFT target's A and B this rank holds: A's input columns and B's output rows, [start, stop)
    (None: all of them)."""
    inputs: tuple[int | None, int | None] = (None, None)
    outputs: tuple[int | None, int | None] = (None, None)

    def in_size(self, full: int) -> int:
        return len(range(full)[slice(*self.inputs)])

    def out_size(self, full: int) -> int:
        return len(range(full)[slice(*self.outputs)])


def _rank_cuts(model: nn.Module) -> dict[str, _Cut]:
    """Per PEFT target, this rank's cut (the model's tensor-parallel shard: whole tensors in a single process).
    Column-parallel projections keep A whole and their rows of B; row-parallel ones their columns of A, B whole."""
    shard, d = model.shard, model.cfg.head_dim
    h = shard.heads
    q, kv, mlp = (h.q_start * d, h.q_stop * d), (h.kv_start * d, h.kv_stop * d), shard.mlp
    return {"q_proj": _Cut(outputs=q), "k_proj": _Cut(outputs=kv), "v_proj": _Cut(outputs=kv),
            "gate_proj": _Cut(outputs=mlp), "up_proj": _Cut(outputs=mlp),
            "o_proj": _Cut(inputs=q), "down_proj": _Cut(inputs=mlp)}


def _decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder layers this rank holds, by global index (a pipeline stage holds a run of them)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None:
        layers = {i: l for i, l in enumerate(layers) if not isinstance(l, MissingLayer)}
    ok = layers is not None and len(layers) > 0 and all(
        hasattr(l, "self_attn") and hasattr(l, "mlp") and all(hasattr(l.self_attn, p) for p in ("qkv_proj", "o_proj"))
        and all(hasattr(l.mlp, p) for p in ("gate_up_proj", "down_proj")) for l in layers.values())
    if not ok:
        raise ValueError(f"LoRA needs a Llama-shaped model (qkv_proj, o_proj, gate_up_proj, down_proj in each decoder "
                         f"layer); {type(model).__name__} is not")
    return layers


__all__ = ["AdapterInfo", "LoRACapacityError", "LoRAExists", "LoRAManager", "LoRANotFound", "TARGETS"]
