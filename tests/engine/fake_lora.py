"""A stand-in for engine_svc.lora.manager.LoRAManager with the same contract and no device weights: it reads a PEFT
adapter_config.json, refuses what a real engine would (rank, target modules), keeps LRU device slots, and records
every call so tests can check the engine's bookkeeping (one unload per adapter, slots never over max_loras)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FakeAdapterInfo:
    name: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


class FakeLoRAManager:
    def __init__(self, max_loras: int = 2, max_rank: int = 16) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.loaded: dict[str, FakeAdapterInfo] = {}
        self.slots: dict[str, int] = {}          # resident adapters, least recently used first
        self.calls: list[tuple] = []

    def load(self, name: str, path: str) -> FakeAdapterInfo:
        self.calls.append(("load", name))
        if name in self.loaded:
            raise KeyError(f"{name} exists")      # the real manager's LoRAExists; the engine checks before
        cfg_path = Path(path) / "adapter_config.json"
        if not cfg_path.is_file():
            raise ValueError(f"no adapter_config.json in {path}")
        cfg = json.loads(cfg_path.read_text())
        rank, modules = int(cfg["r"]), tuple(cfg["target_modules"])
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds max_lora_rank {self.max_rank}")
        unknown = sorted(set(modules) - SERVABLE_MODULES)
        if unknown:
            raise ValueError(f"cannot serve target modules {unknown}")
        info = FakeAdapterInfo(name, path, rank, float(cfg.get("lora_alpha", rank)), modules)
        self.loaded[name] = info
        return info

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        if name not in self.loaded:
            raise KeyError(name)                  # the real manager's LoRANotFound
        del self.loaded[name]
        self.slots.pop(name, None)

    def list(self) -> list[FakeAdapterInfo]:
        return list(self.loaded.values())

    def has(self, name: str) -> bool:
        return name in self.loaded

    def activate(self, names: set[str]) -> dict[str, int]:
        self.calls.append(("activate", frozenset(names)))
        if len(names) > self.max_loras:
            raise ValueError(f"{len(names)} adapters in one step; max_loras is {self.max_loras}")
        missing = names - self.loaded.keys()
        assert not missing, f"activate of adapters not loaded: {missing}"
        for name in names:
            if name in self.slots:
                self.slots[name] = self.slots.pop(name)   # most recently used last
                continue
            free = sorted(set(range(self.max_loras)) - set(self.slots.values()))
            if not free:
                victim = next(n for n in self.slots if n not in names)
                free = [self.slots.pop(victim)]
            self.slots[name] = free[0]
        return {name: self.slots[name] for name in names}


def write_adapter_dir(path: Path, rank: int = 8, target_modules=("q_proj", "v_proj")) -> Path:
    """A PEFT adapter directory's config (the fake reads no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(target_modules)}))
    return path
