"""LoRA adapters as the engine loop sees them: names, admission checks and the unload policy, over the device-side
LoRAManager (engine_svc.lora.manager). Plain Python: no torch; the engine loop thread is its only caller.

Unload policy (drain): an unload stops new requests on the adapter at once (they are rejected with NOT_FOUND),
lets every request already admitted on it (waiting, running, preempted, group members) run to its normal end,
and drops the adapter from the manager once none is left and no step on the device still reads it. Requests
never fail because of an unload, and the adapter's slot and memory are released exactly once, by the manager.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from engine_svc.core.scheduler import AdmissionError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterInfoLike(Protocol):
    name: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


class LoRAManagerLike(Protocol):
    """The part of engine_svc.lora.manager.LoRAManager the engine relies on (the runner calls activate)."""

    max_cpu_loras: int

    def load(self, name: str, path: str) -> AdapterInfoLike: ...
    def unload(self, name: str) -> None: ...
    def list(self) -> list[AdapterInfoLike]: ...
    def has(self, name: str) -> bool: ...


class LoRANotEnabled(RuntimeError):
    """The engine runs without LoRA; maps to FAILED_PRECONDITION."""

    def __init__(self) -> None:
        super().__init__("LoRA is not enabled on this engine (start it with --enable-lora or --lora NAME=PATH)")


class AdapterNotFound(KeyError):
    """An admin call names an adapter that is not loaded; maps to NOT_FOUND."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterExists(ValueError):
    """The name is taken (or its adapter is still being unloaded); maps to ALREADY_EXISTS."""


class InvalidAdapter(ValueError):
    """Not an adapter this engine can serve; maps to INVALID_ARGUMENT."""


class TooManyAdapters(RuntimeError):
    """max_cpu_loras adapters are loaded already; maps to RESOURCE_EXHAUSTED."""


class UnknownAdapter(AdmissionError):
    """A generation request names an adapter that is not loaded, or is being unloaded; maps to NOT_FOUND."""

    def __init__(self, message: str) -> None:
        super().__init__(message, no_capacity=False)


@dataclass(frozen=True)
class AdapterStatus:
    info: AdapterInfoLike
    unloading: bool
    num_requests: int


class AdapterRegistry:
    def __init__(self, manager: LoRAManagerLike | None) -> None:
        self.manager = manager
        self._unloading: dict[str, int] = {}   # name -> requests it had when the unload came

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def check_servable(self, name: str) -> None:
        """Raises UnknownAdapter unless a new request may run on adapter name now."""
        if self.manager is None:
            raise UnknownAdapter(f"adapter: {name!r} is not loaded (LoRA is not enabled on this engine)")
        if name in self._unloading:
            raise UnknownAdapter(f"adapter: {name!r} is being unloaded")
        if not self.manager.has(name):
            raise UnknownAdapter(f"adapter: {name!r} is not loaded")

    def load(self, name: str, path: str) -> AdapterInfoLike:
        manager = self._manager()
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidAdapter(f"name: {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                                 f"letter or digit")
        if not path:
            raise InvalidAdapter("path: must not be empty")
        if name in self._unloading:
            raise AdapterExists(f"adapter {name!r} is still being unloaded; load it again once that is done")
        if manager.has(name):
            raise AdapterExists(f"adapter {name!r} is already loaded")
        if len(manager.list()) >= manager.max_cpu_loras:
            raise TooManyAdapters(f"{manager.max_cpu_loras} adapters are loaded (--max-cpu-loras); unload one first")
        try:
            return manager.load(name, path)
        except (ValueError, OSError) as e:
            raise InvalidAdapter(f"adapter {name!r} at {path}: {e}") from e

    def begin_unload(self, name: str, num_requests: int) -> None:
        """Marks name as unloading; drop_drained() drops it once it is unused."""
        manager = self._manager()
        if not manager.has(name):
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        self._unloading.setdefault(name, num_requests)

    def drop_drained(self, in_use: set[str]) -> list[tuple[str, int]]:
        """Drops every unloading adapter not in in_use; returns (name, requests drained) for each."""
        dropped = []
        for name in [n for n in self._unloading if n not in in_use]:
            drained = self._unloading.pop(name)   # first: should the manager fail, the adapter stays usable
            self.manager.unload(name)
            dropped.append((name, drained))
        return dropped

    def statuses(self, requests_by_adapter: dict[str, int]) -> list[AdapterStatus]:
        manager = self._manager()
        return [AdapterStatus(info, info.name in self._unloading, requests_by_adapter.get(info.name, 0))
                for info in sorted(manager.list(), key=lambda i: i.name)]

    def _manager(self) -> LoRAManagerLike:
        if self.manager is None:
            raise LoRANotEnabled()
        return self.manager
