"""Resident memory of the stack's processes, read from Linux's /proc (elsewhere: nothing is known)."""
from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def children(pid: int) -> list[int]:
    """The direct children of `pid` (for `tandem serve`: its tokenizer, engine and gateway processes)."""
    found = []
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            # The command name in parentheses may hold spaces; the parent pid is the second field after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def name(pid: int) -> str:
    """The module of a `python -m MODULE` process (gateway, tokenizer_svc, engine_svc), else the program."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    args = [a.decode(errors="replace") for a in argv if a]
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    return Path(args[0]).name if args else f"pid {pid}"


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` in MiB; None when the process is gone or /proc cannot tell."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
