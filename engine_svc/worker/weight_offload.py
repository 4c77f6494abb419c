"""Weight offload (`--cpu-offload-gb`): some decoder layers keep their weights in host memory and are streamed to
the device just before they run.

Which layers: as many whole decoder layers as fit in the budget, rounded down to an even count, spread evenly over
the stack (so resident layers run between offloaded ones and hide their copies). Their tensors stay in the format
they were loaded in: a quantized layer's packed weights cross the bus packed.

How: two device staging sets, each one flat buffer holding one offloaded layer's tensors (each host copy has the
same layout, so a layer crosses the bus in one copy). The i-th offloaded layer's tensors are re-pointed (`.data`)
at views into staging set i % 2 for good, so the layer runs unchanged on whatever the set holds.
Before offloaded layer i runs, a forward pre-hook makes the compute stream wait for the copy of its weights
(issuing it first if it was never issued) and then issues the copy of layer i + 1 (cyclically: the last one
prefetches the first for the next step) into the other set, on a side stream that first waits for the work
already queued on the compute stream, which includes layer i - 1, the set's previous reader. So one copy is in
flight while a layer computes. Host copies are pinned on CUDA, so the copies are asynchronous DMA.

Decode CUDA graphs are off with weight offload (the runner decodes eagerly): a graph would replay its copies
without the hooks' ordering, and the copy time, not the launch overhead, bounds an offloaded step.

On the CPU the "device" is host memory too: the copies are real memcpys into the staging sets, so every buffer
handover runs as it does on a GPU, which is what the equivalence tests check.
"""
from __future__ import annotations

import time

import torch
from torch import nn

GB = 1 << 30


def load_device(device: torch.device, quantization: str) -> torch.device:
    """Where a model with offloaded layers is loaded: host memory, so that the device never holds more than the
    resident layers and the staging sets (the model may not fit it whole). fp8 checks the device it loads on, so an
    fp8 model loads on the device first (peak: the whole model; README)."""
    return device if quantization == "fp8" else torch.device("cpu")


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's stack of decoder layers: its first ModuleList with one entry per layer."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError("weight offload: no list of decoder layers found in the model")


class WeightOffload:
    def __init__(self, model: nn.Module, num_layers: int, budget_gb: float, device: torch.device) -> None:
        self.device = device
        layers = decoder_layers(model, num_layers)
        owned = _owned_tensors(model, layers)
        per_layer = [sum(_nbytes(t) for t in owned[i]) for i in range(len(layers))]
        if not per_layer or per_layer[0] == 0:
            raise ValueError("weight offload: the decoder layers hold no weights of their own")
        count = min(len(layers), int(budget_gb * GB) // max(per_layer))
        count -= count % 2   # two staging sets used in turn: the cycle must close evenly
        if count < 2:
            raise ValueError(f"cpu_offload_gb {budget_gb} holds fewer than two decoder layers "
                             f"({max(per_layer) / GB:.3f} GB each)")
        self.layer_ids = sorted({round(k * len(layers) / count) for k in range(count)})
        signature = _signature(owned[self.layer_ids[0]])
        if any(_signature(owned[i]) != signature for i in self.layer_ids):
            raise ValueError("weight offload needs decoder layers of identical shapes")
        # One flat byte buffer per staging set and per offloaded layer's host copy, in the same layout: a layer
        # crosses the bus in one copy.
        layout, size = _layout(owned[self.layer_ids[0]])
        pin = device.type == "cuda"
        self.staging = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        self.host: list[torch.Tensor] = []
        for k, i in enumerate(self.layer_ids):
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            for t, view in zip(owned[i], _views(host, layout)):
                view.copy_(t.detach())
            self.host.append(host)
            for t, staged in zip(owned[i], _views(self.staging[k % 2], layout)):
                t.data = staged   # the layer now reads its staging set; its device copy is freed
            layers[i].register_forward_pre_hook(self._before_layer(k))
        self.offloaded_bytes = sum(per_layer[i] for i in self.layer_ids)
        self.staging_bytes = 2 * size
        self._in_set: list[int | None] = [None, None]   # which offloaded layer each staging set holds or receives
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready: list[torch.cuda.Event | None] = [None, None]
        # Loaded on the host (load_device): the rest of the model, resident, goes to the device now; the offloaded
        # layers' tensors are already views of the device's staging sets. Buffers are rebuilt there.
        model.to(device)
        model.init_buffers(device)
        self.bandwidth = self._measure_bandwidth()

    @property
    def num_offloaded(self) -> int:
        return len(self.layer_ids)

    @property
    def bus_seconds_per_step(self) -> float:
        """Every offloaded layer crosses the bus once per forward."""
        return self.offloaded_bytes / self.bandwidth

    def describe(self) -> str:
        return (f"weight offload: {self.num_offloaded} decoder layers ({self.offloaded_bytes / GB:.2f} GB) "
                f"in host memory, 2 staging sets ({self.staging_bytes / GB:.2f} GB) on {self.device}; bus "
                f"{self.bandwidth / GB:.1f} GB/s measured, {self.bus_seconds_per_step * 1e3:.1f} ms per step")

    def _before_layer(self, k: int):
        def hook(module, args):
            self._issue(k)   # a no-op when the previous layer prefetched it
            if self._stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready[k % 2])
            self._issue((k + 1) % self.num_offloaded)
        return hook

    def _issue(self, k: int) -> None:
        """Starts copying offloaded layer k into its staging set, unless the set already holds or receives it.
        The set's previous reader ran (or is queued) on the compute stream before this point."""
        s = k % 2
        if self._in_set[s] == k:
            return
        self._in_set[s] = k
        if self._stream is None:
            self.staging[s].copy_(self.host[k])
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self.staging[s].copy_(self.host[k], non_blocking=True)
            self._ready[s] = torch.cuda.Event()
            self._ready[s].record(self._stream)

    def _measure_bandwidth(self) -> float:
        """Bytes per second of one layer's copy into a staging set: the fastest of three (set-up costs and a busy
        moment's stall are out)."""
        best = float("inf")
        for _ in range(3):
            self._in_set = [None, None]
            start = time.perf_counter()
            self._issue(0)
            if self._stream is not None:
                self._ready[0].synchronize()
            best = min(best, time.perf_counter() - start)
        return self.staging[0].numel() / max(best, 1e-9)


def _owned_tensors(model: nn.Module, layers: nn.ModuleList) -> list[list[torch.Tensor]]:
    """Each layer's parameters and buffers that nothing else in the model holds (a rotary table shared by every
    layer stays resident), in a fixed order."""
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for t in (*module.parameters(), *module.buffers()):
            seen.setdefault(id(t), t)
        return list(seen.values())

    per_layer = [tensors(layer) for layer in layers]
    count: dict[int, int] = {}
    for ts in per_layer:
        for t in ts:
            count[id(t)] = count.get(id(t), 0) + 1
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    # A module that is also reachable outside the stack (named_modules lists a shared module once, under its
    # first name) is not the layer's own.
    elsewhere = {id(t) for name, m in model.named_modules() if not name.startswith(prefix)
                 for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    shared = elsewhere | {i for i, n in count.items() if n > 1}
    return [[t for t in ts if id(t) not in shared] for ts in per_layer]


_ALIGN = 64   # bytes: every view starts aligned for any dtype (and for vectorized kernels)


def _layout(tensors: list[torch.Tensor]) -> tuple[list[tuple[int, torch.dtype, tuple[int, ...]]], int]:
    """(byte offset, dtype, shape) of each tensor in a flat buffer, and the buffer's size."""
    layout, offset = [], 0
    for t in tensors:
        layout.append((offset, t.dtype, tuple(t.shape)))
        offset += -(-_nbytes(t) // _ALIGN) * _ALIGN
    return layout, offset


def _views(flat: torch.Tensor, layout) -> list[torch.Tensor]:
    out = []
    for offset, dtype, shape in layout:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(flat[offset:offset + n].view(dtype).view(shape))
    return out


def _signature(tensors: list[torch.Tensor]) -> list[tuple]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
