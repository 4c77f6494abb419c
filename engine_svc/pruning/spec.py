"""The sparsity a prune asks for, and the prune's whole configuration: parsed from the command line, validated
once, frozen."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

METHODS = ("magnitude", "wanda")
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class SparsitySpec:
    """Either N:M (n_keep of every m consecutive inputs of a row are kept, the rest zero) or unstructured (a
    `fraction` of each row's inputs is zero). Both are decided within each output row, as Wanda compares scores."""
    n_keep: int | None = None
    m: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.is_n_of_m:
            if self.fraction is not None or not (0 < self.n_keep < self.m):
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.n_keep}:{self.m}")
        elif self.fraction is None or not (0.0 < self.fraction < 1.0):
            raise ValueError(f"unstructured sparsity must be a fraction in (0, 1), got {self.fraction}")

    @property
    def is_n_of_m(self) -> bool:
        return self.n_keep is not None or self.m is not None

    @property
    def is_two_four(self) -> bool:
        """The pattern torch's semi-structured sparse kernels run."""
        return (self.n_keep, self.m) == (2, 4)

    @property
    def zero_fraction(self) -> float:
        return 1.0 - self.n_keep / self.m if self.is_n_of_m else self.fraction

    def pruned_per_row(self, in_features: int) -> int:
        """Zeros in a row of an unstructured prune: the fraction of the row, rounded to the nearest count."""
        return round(self.fraction * in_features)

    def label(self) -> str:
        return f"{self.n_keep}:{self.m}" if self.is_n_of_m else f"{self.fraction:g}"


def parse_sparsity(text: str) -> SparsitySpec:
    """'2:4' / '4:8' (N of every M kept) or a fraction such as '0.5' (that share zero, unstructured)."""
    match = _N_OF_M.match(text.strip())
    if match:
        return SparsitySpec(n_keep=int(match.group(1)), m=int(match.group(2)))
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"--sparsity must be N:M (e.g. 2:4) or a fraction in (0, 1) (e.g. 0.5), got {text!r}") \
            from None
    return SparsitySpec(fraction=fraction)


@dataclass(frozen=True)
class PruneConfig:
    source: Path              # an HF directory or a .gguf file with real weights
    output: Path              # the HF directory written
    method: str               # magnitude | wanda
    sparsity: SparsitySpec
    calib_text: Path          # wanda: the calibration text
    calib_tokens: int         # wanda: tokens of calib_text run through the engine (its last ones)
    calib_window: int         # wanda: the calibration text is cut into requests of at most this many tokens
    device: str = "auto"      # wanda: where the engine runs the calibration
    overwrite: bool = False
    max_shard_bytes: int = 2 << 30   # the writer's output shards: the memory it holds besides one input tensor

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.source.exists():
            raise FileNotFoundError(f"no model at {self.source}")
        if not (self.source.is_dir() or self.source.suffix == ".gguf"):
            raise ValueError(f"{self.source}: expected an HF directory or a .gguf file")
        if self.source.is_dir() and not (self.source / "config.json").is_file():
            raise ValueError(f"{self.source} has no config.json: not an HF model directory")
        if self.output.resolve() == self.source.resolve():
            raise ValueError("the output directory must differ from the input model")
        if self.output.exists() and not self.overwrite and any(self.output.iterdir()):
            raise ValueError(f"{self.output} exists and is not empty (pass --overwrite to replace its files)")
        if self.method == "wanda" and not self.calib_text.is_file():
            raise FileNotFoundError(f"--calib: no file at {self.calib_text}")
        if self.calib_tokens < 2:
            raise ValueError(f"--calib-tokens must be at least 2, got {self.calib_tokens}")
        if self.calib_window < 2:
            raise ValueError(f"--calib-window must be at least 2, got {self.calib_window}")
        if self.max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
