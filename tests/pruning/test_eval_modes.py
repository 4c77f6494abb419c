"""`tandem eval`'s pruned modes: what they are, where their checkpoints go, and the calibration overlap it reports."""
from __future__ import annotations

import pytest

from benchmarks.quality_modes import MODES, mode_fields
from benchmarks.quality_pruned import calibration_overlap, checkpoint_dir


def test_the_pruned_modes_name_a_method_and_a_sparsity_and_are_no_engine_setting():
    assert {n: m.prune for n, m in MODES.items() if m.prune} == {
        "mag24": ("magnitude", "2:4"), "wanda24": ("wanda", "2:4"), "wanda48": ("wanda", "4:8"),
        "mag50": ("magnitude", "0.5"), "wanda50": ("wanda", "0.5")}
    assert all(m.quantization == "none" and m.dtype == "auto" for m in MODES.values() if m.prune)
    with pytest.raises(ValueError, match="pruned checkpoint"):
        mode_fields("wanda24")


def test_each_mode_and_model_gets_its_own_checkpoint_dir(tmp_path):
    model, text = tmp_path / "m.gguf", tmp_path / "t.txt"
    model.write_bytes(b"x")
    text.write_text("t")
    a, b = (checkpoint_dir(str(model), MODES[n], tmp_path / "cache", text) for n in ("wanda24", "mag24"))
    assert a != b and a.parent == tmp_path / "cache" and a.name.startswith("m-wanda24-")
    assert checkpoint_dir(str(model), MODES["wanda24"], tmp_path / "cache", text) == a
    model.write_bytes(b"changed")
    assert checkpoint_dir(str(model), MODES["wanda24"], tmp_path / "cache", text) != a


def test_the_overlap_counts_scored_tokens_among_the_last_2048():
    assert calibration_overlap(39357, 8192, same_text=True) == 0
    assert calibration_overlap(39357, 39357, same_text=True) == 2048
    assert calibration_overlap(39357, 38000, same_text=True) == 38000 - (39357 - 2048)
    assert calibration_overlap(1000, 1000, same_text=True) == 1000
    assert calibration_overlap(39357, 39357, same_text=False) == 0
