"""`tandem prune` (python -m engine_svc.pruning): magnitude or Wanda pruning of a checkpoint's decoder linears into
a new HF safetensors directory.

    tandem prune --output pruned-24 --method wanda --sparsity 2:4
    tandem prune --model DIR_OR_GGUF --output pruned-50 --method wanda --sparsity 0.5 --calib-tokens 4096
    tandem prune --output mag-24 --method magnitude --sparsity 2:4

Wanda's activation norms come from --calib (default: the Alice text `tandem eval` scores, its last --calib-tokens
tokens, so `tandem eval --max-tokens N` with N below the text's length minus those measures text the calibration
never saw) run through the engine. Magnitude needs no engine: it streams the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.quality_data import DEFAULT_TEXT

DEFAULT_CALIB_TOKENS = 2048
DEFAULT_CALIB_WINDOW = 512


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF directory or .gguf with real weights (`tandem prune` passes the default model's path "
                        "when none is given)")
    p.add_argument("--output", required=True, type=Path, help="the HF directory to write")
    p.add_argument("--method", choices=("magnitude", "wanda"), default="wanda")
    p.add_argument("--sparsity", default="2:4", help="N:M (2:4, 4:8) or an unstructured fraction (0.5)")
    p.add_argument("--calib", type=Path, default=DEFAULT_TEXT, help="wanda: calibration text file")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help="wanda: tokens of the calibration text (its last ones) (default %(default)s)")
    p.add_argument("--calib-window", type=int, default=DEFAULT_CALIB_WINDOW,
                   help="wanda: tokens per calibration request (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="wanda: calibration device")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    return p


def config_from_args(args: argparse.Namespace):
    from engine_svc.pruning.spec import PruneConfig, parse_sparsity
    return PruneConfig(source=resolve_source(args.model), output=args.output.expanduser().absolute(),
                       method=args.method, sparsity=parse_sparsity(args.sparsity),
                       calib_text=args.calib.expanduser(), calib_tokens=args.calib_tokens,
                       calib_window=args.calib_window, device=args.device, overwrite=args.overwrite)


def resolve_source(value: str) -> Path:
    return Path(value).expanduser().absolute()


def run_prune(config) -> dict:
    """Prunes per `config` (a PruneConfig); returns what it did, for the caller to print."""
    from engine_svc.pruning.checkpoint_writer import source_tensors, write_pruned_checkpoint
    from engine_svc.pruning.hf_export import source_hf_config
    from engine_svc.pruning.progress_bar import ProgressBar

    if source_hf_config(config.source).get("quantization_config"):
        raise ValueError(f"{config.source} holds quantized weights; prune a full-precision checkpoint")
    t0 = time.perf_counter()
    label = f"{config.method} {config.sparsity.label()}"
    norms, calibration = None, None
    if config.method == "wanda":
        from engine_svc.loader import read_model_config
        from engine_svc.pruning.calibration import calibrated_norms

        layers = read_model_config(config.source).num_layers
        bar = ProgressBar(layers * 4, f"{label}: calibrating and pruning in the engine")
        norms = calibrated_norms(config, bar.advance)
        if bar.done != bar.total:   # families with another count of linears per layer
            bar.advance(steps=bar.total - bar.done)
        calibration = {"text": config.calib_text.name, "tokens": config.calib_tokens, "window": config.calib_window}
    bar = ProgressBar(source_tensors(config.source).total, f"{label}: writing {config.output.name}")
    summary = write_pruned_checkpoint(config, norms, bar.advance, calibration)
    return {"output": str(config.output), "method": config.method, "sparsity": config.sparsity.label(),
            "pruned_layers": summary.pruned_layers, "zero_fraction": summary.zero_fraction,
            "bytes_written": summary.bytes_written, "shards": summary.shards, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_prune(config_from_args(args))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pruned {result['pruned_layers']} linear layers ({result['method']} {result['sparsity']}, "
          f"{100 * result['zero_fraction']:.2f}% of their weights zero) into {result['output']} "
          f"({result['bytes_written'] / 2**30:.3f} GB in {len(result['shards'])} file(s), {result['seconds']:.0f} s)")
    return 0
