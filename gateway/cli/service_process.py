"""One child service process: spawn it in its own process group, relay its output, stop it.

Invariants:
- Each child leads its own process group, so a terminal Ctrl-C reaches only the launcher, which then stops the
  children in order; and a stop signal reaches whatever the child itself started in that group.
- On Linux each child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a launcher that is
  killed outright (SIGKILL, OOM) leaves no orphans. The kernel ties this to the *thread* that forked the child,
  so children must be spawned from a thread that lives as long as the launcher: the launcher's main thread.
- The child's stdout and stderr are merged into one pipe, relayed line by line with a name prefix, and the last
  lines are kept so a crash can be reported with its cause.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Sequence, TextIO

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
NAME_WIDTH = 9  # len("tokenizer"): keeps the relayed lines aligned


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when the launcher dies (Linux only).

    libc and the parent pid are resolved here, before the fork, so the child runs only a foreign call and a
    getppid between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died between fork and prctl: nobody will signal us
            os._exit(1)

    return preexec


class ServiceProcess:
    """A started service. Not thread-safe: only the launcher's main thread calls its methods."""

    def __init__(self, name: str, argv: Sequence[str], out: TextIO, out_lock: threading.Lock,
                 tail_lines: int, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self._out = out
        self._out_lock = out_lock
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        child_env = dict(os.environ if env is None else env)
        # Children write to a pipe, not a terminal: unbuffered so a crash's last words are not lost in a buffer.
        child_env["PYTHONUNBUFFERED"] = "1"
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
            preexec_fn=_die_with_parent_preexec(),
        )
        self._relay = threading.Thread(target=self._relay_output, name=f"relay-{name}", daemon=True)
        self._relay.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self) -> str:
        """The last relayed lines. After an exit, waits briefly for the pipe to drain so the cause is in it."""
        if self._proc.poll() is not None:
            self._relay.join(timeout=1.0)
        return "".join(self._tail)

    def signal_group(self, sig: int) -> None:
        """Sends sig to the child's process group while the child has not been reaped (after reaping, its pid,
        which is also the group id, could belong to someone else)."""
        if self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def _relay_output(self) -> None:
        prefix = f"{self.name:>{NAME_WIDTH}} | "
        assert self._proc.stdout is not None
        with self._proc.stdout:
            for raw in iter(self._proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if not line.endswith("\n"):
                    line += "\n"
                self._tail.append(line)
                with self._out_lock:
                    try:
                        self._out.write(prefix + line)
                        self._out.flush()
                    except (OSError, ValueError):
                        pass  # our own output is gone (closed terminal); keep draining so the child never blocks
