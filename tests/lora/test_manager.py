"""LoRAManager: the registry (load/unload/list, refusals with precise messages), the max_cpu_loras bound, and the
device slots: exact LRU eviction order and slot contents (each slot holds exactly its adapter's A and scaled B)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_svc.lora.manager import LoRACapacityError, LoRAExists, LoRAManager, LoRANotFound
from tests.engine.family_checks import make_engine
from tests.lora.peft_fixtures import write_peft_adapter


def manager(base, **kw) -> LoRAManager:
    cfg = dict(max_loras=2, max_lora_rank=16, max_cpu_loras=4)
    cfg.update(kw)
    return make_engine(base, enable_lora=True, **cfg).runner.lora


@pytest.fixture(scope="module")
def adapter_c(tiny_llama, tmp_path_factory):
    return write_peft_adapter(tiny_llama, tmp_path_factory.mktemp("adapter-c"), r=2, alpha=2,
                              targets=["down_proj"], seed=3)


def copy_adapter(src, dst, config_changes=None, tensors=None):
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(load_file(src / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_load_reports_the_adapter_and_lists_it(tiny_llama, adapter_a, adapter_b):
    m = manager(tiny_llama)
    a = m.load("a", str(adapter_a))
    assert (a.name, a.rank, a.alpha, a.target_modules) == ("a", 4, 8.0, ("o_proj", "q_proj", "v_proj"))
    b = m.load("b", str(adapter_b))
    assert b.rank == 8 and len(b.target_modules) == 7
    assert [i.name for i in m.list()] == ["a", "b"] and m.has("a") and not m.has("zzz")
    with pytest.raises(LoRAExists):
        m.load("a", str(adapter_b))
    m.unload("a")
    assert [i.name for i in m.list()] == ["b"]
    with pytest.raises(LoRANotFound):
        m.unload("a")


def test_lru_eviction_order_is_exact(tiny_llama, adapter_a, adapter_b, adapter_c):
    m = manager(tiny_llama, max_loras=2)
    for name, path in (("a", adapter_a), ("b", adapter_b), ("c", adapter_c)):
        m.load(name, str(path))
    assert m.activate({"a"}) == {"a": 0}
    assert m.activate({"b"}) == {"b": 1}
    assert m.activate({"a"}) == {"a": 0}                 # a used last: b is now least recently used
    assert m.activate({"c"}) == {"c": 1}                 # evicts b, not a
    assert m.resident() == {"a": 0, "c": 1}
    assert m.activate({"b", "c"}) == {"b": 0, "c": 1}    # a is the only resident the step can spare
    assert list(m.resident()) == ["c", "b"]              # c touched before b was made resident
    with pytest.raises(ValueError, match="max_loras is 2"):
        m.activate({"a", "b", "c"})
    with pytest.raises(LoRANotFound):
        m.activate({"nope"})
    m.unload("b")                                        # frees its slot: the next adapter takes it, no eviction
    assert m.activate({"a"}) == {"a": 0} and m.resident() == {"c": 1, "a": 0}


def test_slots_hold_exactly_their_adapter(tiny_llama, adapter_a, adapter_b):
    m = manager(tiny_llama, max_loras=1)
    m.load("a", str(adapter_a))
    m.load("b", str(adapter_b))
    m.activate({"b"})
    m.activate({"a"})   # overwrites b's slot: nothing of b may remain (a leaves the MLP and k alone)
    raw = load_file(adapter_a / "adapter_model.safetensors")
    scale = 8 / math.sqrt(4)   # rsLoRA
    lin = m.linears[1]["qkv_proj"]
    q_a = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    q_b = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(lin.lora_a[0, :4], q_a)
    assert not lin.lora_a[0, 4:16].any() and not lin.lora_a[0, 16:32].any()    # rank padding; k untouched
    torch.testing.assert_close(lin.lora_b[0, :64, :4], q_b * scale)
    assert not lin.lora_b[0, 64:96].any()                                       # k's outputs
    for proj in ("gate_up_proj", "down_proj"):
        assert not m.linears[0][proj].lora_a.any() and not m.linears[0][proj].lora_b.any()
    assert m.batch.slot_ranks.tolist() == [4]
    m.unload("a")
    assert m.batch.slot_ranks.tolist() == [0] and not lin.lora_a.any() and not lin.lora_b.any()


def test_max_cpu_loras_bounds_the_loaded_adapters(tiny_llama, adapter_a, adapter_b, adapter_c):
    m = manager(tiny_llama, max_loras=1, max_cpu_loras=2)
    m.load("a", str(adapter_a))
    m.load("b", str(adapter_b))
    with pytest.raises(LoRACapacityError, match="max_cpu_loras"):
        m.load("c", str(adapter_c))
    m.unload("a")
    m.load("c", str(adapter_c))
    assert [i.name for i in m.list()] == ["b", "c"]
    with pytest.raises(ValueError, match="max_cpu_loras"):
        manager(tiny_llama, max_loras=3, max_cpu_loras=2)


def test_rank_above_max_lora_rank_is_refused(tiny_llama, adapter_b):
    with pytest.raises(ValueError, match="LoRA rank 8 exceeds max_lora_rank 4"):
        manager(tiny_llama, max_lora_rank=4).load("b", str(adapter_b))


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"]])
def test_unservable_targets_are_refused(tiny_llama, tmp_path, targets):
    path = write_peft_adapter(tiny_llama, tmp_path / "ad", r=2, alpha=2, targets=targets, seed=5)
    with pytest.raises(ValueError, match=r"unsupported LoRA target modules \[.(lm_head|embed_tokens).\]"):
        manager(tiny_llama).load("x", str(path))
    # with the list in the config replaced by a pattern, the tensors themselves are refused
    copy_adapter(path, tmp_path / "regex", {"target_modules": ".*"})
    with pytest.raises(ValueError, match="unsupported LoRA tensor .*(lm_head|embed_tokens)"):
        manager(tiny_llama).load("x", str(tmp_path / "regex"))


def test_bad_directories_are_refused(tiny_llama, adapter_a, tmp_path):
    m = manager(tiny_llama)
    with pytest.raises(ValueError, match="is not a directory"):
        m.load("x", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        m.load("x", str(tmp_path / "empty"))
    bad_json = copy_adapter(adapter_a, tmp_path / "bad-json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        m.load("x", str(bad_json))
    no_weights = copy_adapter(adapter_a, tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        m.load("x", str(no_weights))
    broken = copy_adapter(adapter_a, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        m.load("x", str(broken))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        m.load("x", str(copy_adapter(adapter_a, tmp_path / "dora", {"use_dora": True})))
    assert m.list() == []


def test_shape_mismatches_are_refused(tiny_llama, adapter_a, tmp_path):
    m = manager(tiny_llama)
    with pytest.raises(ValueError, match=r"layer 0 o_proj: lora_A \(8, 64\) / lora_B \(64, 8\) do not fit .*\(4, 64\)"):
        m.load("x", str(copy_adapter(adapter_a, tmp_path / "r", tensors=lambda t: {
            k: (torch.zeros(8, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 8)) for k, v in t.items()})))
    with pytest.raises(ValueError, match="do not fit the base model"):   # made for a wider model
        m.load("x", str(copy_adapter(adapter_a, tmp_path / "wide", tensors=lambda t: {
            k: (torch.zeros(4, 96) if "lora_A" in k else v) for k, v in t.items()})))
    with pytest.raises(ValueError, match="is for layer 5; the model has 2"):
        m.load("x", str(copy_adapter(adapter_a, tmp_path / "deep", tensors=lambda t: {
            k.replace("layers.1.", "layers.5."): v for k, v in t.items()})))
    with pytest.raises(ValueError, match="lora_A and lora_B must both be present"):
        m.load("x", str(copy_adapter(adapter_a, tmp_path / "half", tensors=lambda t: {
            k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})))
