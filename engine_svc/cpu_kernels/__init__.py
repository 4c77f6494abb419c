"""Hand-written C++ kernels for the CPU's single-token decode step, built with g++ on first use, cached by content,
and loaded as torch ops under torch.ops.tandem_cpu, which inductor graphs call like any op:

- gemv.cpp: q4_gemv / q8_gemv, the batch-1 GEMVs over GGUF blocks (engine_svc.quant.gguf_gemv's forms) with the
  float32 path's exact weights; AVX-512 where the CPU has it (isa() says), portable C++ elsewhere.
- decode_attention.cpp: decode_attention, one sequence's single-token attention over a paged float32 KV cache.

load() builds them into one library (about 15 s, once per source, torch version and compiler; later starts load
the cached library in well under a second) and returns the ops, or None with the reason in load_error(): no g++,
a failed build, a torch without its C++ headers. The engine then keeps its inductor and eager paths. The library
is built for any x86-64 CPU and picks its code at run time.

The cache lives in $TANDEM_KERNEL_CACHE, else ~/.cache/tandem/kernels. A build writes to a temporary name and
renames, so concurrent starts never load a half-written library.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemv.cpp", "gemv_i8x3.cpp", "decode_attention.cpp"))
NAMESPACE = "tandem_cpu"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")

_lock = threading.Lock()
_state: dict[str, object] = {}   # "ops" once loaded, or "error": the reason they could not be


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_KERNEL_CACHE", Path.home() / ".cache" / "tandem" / "kernels"))


def _compile_command(out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["g++", *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
            *map(str, SOURCES), "-o", str(out), *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]


def _library_path() -> Path:
    """The cached library for these sources, torch and g++ (its name hashes all of them)."""
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES), torch.__version__.encode(), compiler.encode(),
                 " ".join(_FLAGS).encode()):
        digest.update(part)
    return cache_dir() / f"tandem_cpu_{digest.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.so")
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ failed ({done.returncode}): {done.stderr.strip()[-600:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _register_fakes() -> None:
    """Shapes for tracing (make_fx) and inductor: each op returns a new float32 tensor."""
    fake = torch.library.register_fake
    fake(f"{NAMESPACE}::q4_gemv")(lambda x, codes, scales, offsets: x.new_empty(codes.shape[0]))
    fake(f"{NAMESPACE}::q8_gemv")(lambda x, codes, scales: x.new_empty(codes.shape[0]))
    fake(f"{NAMESPACE}::q4_gemv_i8x3")(lambda x, codes, scales, offsets: x.new_empty(codes.shape[0]))
    fake(f"{NAMESPACE}::decode_attention")(lambda q, *rest: torch.empty_like(q))


def load():
    """torch.ops.tandem_cpu, built and loaded on first call; None if it cannot be (see load_error)."""
    with _lock:
        if not _state:
            try:
                if platform.machine() not in ("x86_64", "AMD64"):
                    raise RuntimeError(f"x86-64 only, this is {platform.machine()}")
                if shutil.which("g++") is None:
                    raise RuntimeError("no g++ on PATH")
                path = _library_path()
                if not path.exists():
                    _build(path)
                torch.ops.load_library(str(path))
                _register_fakes()
                _state["ops"] = getattr(torch.ops, NAMESPACE)
            except Exception as err:   # noqa: BLE001  (a build can fail in many ways; the engine falls back)
                _state["error"] = f"{type(err).__name__}: {str(err)[:600]}"
        return _state.get("ops")


def load_error() -> str | None:
    return _state.get("error")


def describe_gemv() -> str:
    """Which GEMV code runs, for the start log: e.g. 'C++ avx512-vnni'."""
    ops = load()
    if ops is None:
        return f"inductor (C++ kernels unavailable: {load_error()})"
    return f"C++ {ops.isa()}"
