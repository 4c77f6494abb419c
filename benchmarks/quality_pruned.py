"""The checkpoints `tandem eval`'s pruned modes serve: the eval model pruned by `tandem prune` (engine_svc.pruning)
with the mode's method and sparsity, written once under --pruned-dir and reused while the model file and the
calibration settings stay the same (a change to the pruning code itself is not detected: delete the directory)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from benchmarks.quality_modes import Mode
from engine_svc.pruning.prune_command import DEFAULT_CALIB_TOKENS as CALIB_TOKENS


def checkpoint_dir(model: str, mode: Mode, cache: Path, calib_text: Path) -> Path:
    """A directory named by the mode and a digest of what determines its weights."""
    source = Path(model)
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{mode.prune}|{calib_text.resolve()}|{CALIB_TOKENS}"
    return cache / f"{source.stem}-{mode.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def pruned_checkpoint(model: str, mode: Mode, cache: Path, calib_text: Path, device: str) -> Path:
    """The pruned HF directory for `mode`, pruned now unless an earlier run wrote it (its config.json is written
    last, so one that exists marks a complete checkpoint)."""
    from engine_svc.pruning.prune_command import DEFAULT_CALIB_WINDOW, run_prune
    from engine_svc.pruning.spec import PruneConfig, parse_sparsity

    out = checkpoint_dir(model, mode, cache, calib_text)
    if (out / "config.json").is_file():
        return out
    method, sparsity = mode.prune
    print(f"[eval] {mode.name}: pruning {Path(model).name} ({method} {sparsity}) into {out}", file=sys.stderr,
          flush=True)
    run_prune(PruneConfig(source=Path(model), output=out, method=method, sparsity=parse_sparsity(sparsity),
                          calib_text=calib_text, calib_tokens=CALIB_TOKENS, calib_window=DEFAULT_CALIB_WINDOW,
                          device=device, overwrite=True))
    return out


def calibration_overlap(text_tokens: int, scored_tokens: int, same_text: bool) -> int:
    """Scored tokens that Wanda's calibration also saw: it takes the last CALIB_TOKENS (2048) of its text, the eval
    scores the first scored_tokens of its own."""
    if not same_text:
        return 0
    return max(0, scored_tokens - max(0, text_tokens - CALIB_TOKENS))
