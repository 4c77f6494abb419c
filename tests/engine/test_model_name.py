"""The name a model is served under: the GGUF file's published name, not its `general.name`; an HF directory's
(or hub repository's) name; --served-model-name over both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_svc.model_name import gguf_served_name, hf_dir_served_name

TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                   rms_norm_eps=1e-5, eos_token_id=2, torch_dtype="float32")


def test_the_default_model_is_served_as_smollm2_135m_instruct(smollm2_gguf: Path) -> None:
    from engine_svc.loader.gguf_loader import gguf_field, gguf_model_config, open_gguf

    assert gguf_field(open_gguf(smollm2_gguf), "general.name") == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # not this
    assert gguf_model_config(smollm2_gguf).name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("file, name", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "Meta-Llama-3-8B-Instruct"),
    ("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct"),
    ("Mistral-7B-v0.1-IQ2_XXS.gguf", "Mistral-7B-v0.1"),
    ("gemma-2b-it.bf16.gguf", "gemma-2b-it"),
    ("Mixtral-8x7B-Instruct-v0.1-Q5_K_S-00001-of-00003.gguf", "Mixtral-8x7B-Instruct-v0.1"),
    ("phi-2.gguf", "phi-2"),                        # nothing to strip
    ("tinyllama-1.1b-chat-v1.0_F16.gguf", "tinyllama-1.1b-chat-v1.0"),
])
def test_a_gguf_is_named_after_its_file_less_the_quantization(file: str, name: str) -> None:
    assert gguf_served_name(Path("/models") / file, lambda key: pytest.fail(f"metadata read: {key}")) == name


def test_a_generically_named_gguf_takes_its_name_from_the_metadata() -> None:
    full = {"general.basename": "Llama-3", "general.size_label": "8B", "general.finetune": "Instruct",
            "general.version": "v0.1", "general.name": "Llama 3 8B Instruct"}
    assert gguf_served_name(Path("/m/model-Q4_0.gguf"), full.get) == "Llama-3-8B-Instruct-v0.1"
    assert gguf_served_name(Path("/m/ggml-model.gguf"), {"general.name": "Llama 3 8B Instruct"}.get) == \
        "Llama 3 8B Instruct"
    assert gguf_served_name(Path("/m/model.gguf"), {}.get) == "model"


def test_a_synthetic_gguf_is_read_through_the_loader(tmp_path: Path) -> None:
    """A GGUF written with the gguf package under a generic file name: the loader reads the naming fields."""
    gguf = pytest.importorskip("gguf")
    from engine_svc.loader.gguf_loader import gguf_model_config

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Llama Chat")
    writer.add_basename("TinyLlama")
    writer.add_size_label("1.1B")
    writer.add_finetune("Chat")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64),
                       (writer.add_embedding_length, 32), (writer.add_feed_forward_length, 64),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 1), (writer.add_vocab_size, 64)):
        add(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_model_config(path).name == "TinyLlama-1.1B-Chat"


def test_an_hf_directory_is_named_after_itself_or_its_hub_repository(tmp_path: Path) -> None:
    from engine_svc.model_config import ModelConfig

    plain = tmp_path / "SmolLM2-135M-Instruct"
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M-Instruct" / "snapshots" / "0123abcd"
    for d in (plain, snapshot):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert ModelConfig.from_hf_dir(plain).name == "SmolLM2-135M-Instruct"
    assert ModelConfig.from_hf_dir(snapshot).name == "SmolLM2-360M-Instruct"
    assert hf_dir_served_name(tmp_path / "models--gpt2" / "snapshots" / "abc") == "gpt2"


def test_served_model_name_overrides_the_derived_name(tmp_path: Path) -> None:
    from engine_svc.config import EngineConfig
    from engine_svc.engine import Engine

    model = tmp_path / "Tiny-Llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    common = dict(model=str(model), load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=8,
                  block_size=4, max_num_seqs=2)
    assert Engine(EngineConfig(**common)).model_name == "Tiny-Llama"
    assert Engine(EngineConfig(**common, served_model_name="prod-chat")).model_name == "prod-chat"
