"""The Hugging Face <-> megatron-core mapping on its own: config.json reading and refusals,
the fused QKV and GLU layouts, and TP sharding (oracle: the inverse operations and
megatron-core's layout as written in the module docstring)."""

from __future__ import annotations

import json

import pytest
import torch

from adadpo_megatron.mcore.hf_mapping import (
    _fuse_qkv,
    _split_qkv,
    read_architecture,
    shard_of,
)
from tests.support.training import _unshard

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 160,
         "vocab_size": 384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                             "rope_theta": 500000.0}}


def write_config(tmp_path, **changes):
    config = {**LLAMA, **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_llama31_config_reads_as_the_model_section(tmp_path):
    arch = read_architecture(write_config(tmp_path))
    section = arch.model_section()
    assert (section["num_query_groups"], section["kv_channels"], section["rotary_base"]) == \
        (2, 16, 500000.0)
    assert section["rope_scaling"] is True and section["rope_scaling_factor"] == 8.0
    assert section["add_qkv_bias"] is False and arch.vocab_size == 384
    # transformers 4.x layout: rope_theta and rope_scaling at the top level
    legacy = write_config(tmp_path, rope_parameters=None, rope_theta=10000.0,
                          rope_scaling={"type": "llama3", "factor": 32.0})
    assert read_architecture(legacy).model_section()["rope_scaling_factor"] == 32.0


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; adadpo-megatron maps llama"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     r"rope low_freq_factor=2.0; megatron-core's llama3 rope scaling fixes it at 1.0"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn'"),
    ({"model_type": "mistral", "sliding_window": 4096}, r"sliding_window=4096"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 4096},
     r"use_sliding_window=true is not supported"),
    ({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
      "moe_intermediate_size": 32, "decoder_sparse_step": 2},
     r"decoder_sparse_step=2 / mlp_only_layers=None: only models whose every layer"),
    ({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
     r"shared experts are not mapped"),
])
def test_what_the_mapping_does_not_cover_is_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        read_architecture(write_config(tmp_path, **changes))


def test_a_contradicting_model_key_names_both_values(tmp_path):
    from adadpo_megatron.mcore.model_config import ModelConfig

    directory = write_config(tmp_path)
    config = ModelConfig.from_section({"hf": str(directory)})
    assert config.rope_scaling and config.vocab_size == 384
    assert config.transformer["num_layers"] == 2
    with pytest.raises(ValueError, match=r"model.hidden_size=128 contradicts model.hf's .*"
                                         r"config.json \(64\)"):
        ModelConfig.from_section({"hf": str(directory), "hidden_size": 128})
    # what config.json does not decide stays the user's
    assert ModelConfig.from_section({"hf": str(directory), "fused_logprobs": True}).fused_logprobs


def test_fused_qkv_groups_queries_with_their_key_and_value(tmp_path):
    arch = read_architecture(write_config(tmp_path))
    d = arch.head_dim
    q = torch.arange(4 * d, dtype=torch.float32)[:, None].expand(-1, 3)  # heads 0..3
    k = 100 + torch.arange(2 * d, dtype=torch.float32)[:, None].expand(-1, 3)
    v = 200 + torch.arange(2 * d, dtype=torch.float32)[:, None].expand(-1, 3)
    fused = _fuse_qkv(q, k, v, arch)
    # group 0: query heads 0 and 1, key head 0, value head 0; then group 1
    expected = torch.cat([q[:2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(_split_qkv(fused, arch), (q, k, v),
                                                  strict=True))


@pytest.mark.parametrize("stride", [1, 2])
def test_tp_shards_reassemble_to_the_full_tensor(stride):
    full = torch.randn(16, 5)
    param = torch.nn.Parameter(torch.empty(8, 5))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, stride
    shards = [shard_of(full, param, rank, 2) for rank in range(2)]
    assert torch.equal(_unshard(shards, 0, stride), full)
    if stride == 2:  # GLU: each rank holds its slice of the gate, then of the up projection
        gate, up = full.chunk(2)
        assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))


def test_llama31_presets_carry_rope_scaling():
    from adadpo_megatron.mcore.model_config import ModelConfig

    for preset, scaled in (("llama3-8b", False), ("llama3.1-8b", True), ("llama3.1-70b", True)):
        config = ModelConfig.from_section({"preset": preset})
        assert config.rope_scaling is scaled and config.rope_scaling_factor == 8.0, preset


def test_qwen3_config_reads_with_qk_layernorm_and_its_own_head_dim(tmp_path):
    """Qwen3 (Qwen3-0.6B's shape: 16 heads of 128 over hidden 1024) normalises each query and
    key head, and its head_dim is not hidden / heads."""
    arch = read_architecture(write_config(tmp_path, model_type="qwen3", hidden_size=1024,
                                          num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128, attention_bias=False,
                                          sliding_window=None, use_sliding_window=False))
    section = arch.model_section()
    assert section["qk_layernorm"] is True and section["kv_channels"] == 128
    assert section["add_qkv_bias"] is False
    assert read_architecture(write_config(tmp_path)).model_section()["qk_layernorm"] is False


def test_a_run_without_a_source_exports_qwen3_as_qwen3(tmp_path):
    """adadpo-export-hf of a checkpoint with no Hugging Face source writes the config from the
    run's model section: qk_layernorm makes it a Qwen3Config, which transformers reads back."""
    import transformers

    from adadpo_megatron.training.huggingface.hf_export import _architecture, _write_config

    run = {"model": {"transformer": {"num_layers": 2, "hidden_size": 64,
                                     "num_attention_heads": 4, "num_query_groups": 2,
                                     "kv_channels": 24, "ffn_hidden_size": 160,
                                     "normalization": "RMSNorm", "gated_linear_unit": True,
                                     "add_bias_linear": False, "qk_layernorm": True,
                                     "layernorm_epsilon": 1e-6},
                     "activation": "swiglu", "position_embedding_type": "rope",
                     "rotary_base": 1000000.0, "share_embeddings_and_output_weights": True},
           "data": {"seq_length": 256}}
    arch = _architecture(None, run)
    assert arch.model_type == "qwen3" and arch.qk_layernorm
    _write_config(tmp_path, arch, None, "float32")
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, transformers.Qwen3Config)
    assert (config.head_dim, config.tie_word_embeddings, config.attention_bias) == \
        (24, True, False)
    assert read_architecture(tmp_path).model_section()["qk_layernorm"] is True


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_config_reads_as_experts_with_its_routing(tmp_path, norm_topk_prob):
    """Qwen3-30B-A3B's config.json keys (num_experts, as the Hub writes them)."""
    arch = read_architecture(write_config(
        tmp_path, model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=norm_topk_prob, head_dim=128,
        decoder_sparse_step=1, mlp_only_layers=[]))
    section = arch.model_section()
    assert (section["num_moe_experts"], section["moe_router_topk"],
            section["moe_ffn_hidden_size"]) == (128, 8, 768)
    # top-k, then a softmax over the k, is renormalising: softmax first only without it
    assert section["moe_router_pre_softmax"] is (not norm_topk_prob)
    assert section["qk_layernorm"] and section["moe_aux_loss_coeff"] == 0.0
    assert section["moe_router_load_balancing_type"] == "none"


@pytest.mark.parametrize("section,message", [
    ({"preset": "tiny", "moe_router_topk": 2}, r"model\.moe_router_topk set on a dense model"),
    ({"preset": "tiny", "moe_train_router": True},
     r"model\.moe_train_router set on a dense model"),
])
def test_expert_keys_on_a_dense_model_are_refused_by_name(section, message):
    from adadpo_megatron.mcore.model_config import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_section(section)


def test_a_run_without_a_source_exports_qwen3_moe_with_its_routing(tmp_path):
    import transformers

    from adadpo_megatron.training.huggingface.hf_export import _architecture, _write_config

    transformer = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "num_query_groups": 2, "kv_channels": 24, "ffn_hidden_size": 160,
                   "normalization": "RMSNorm", "gated_linear_unit": True,
                   "add_bias_linear": False, "qk_layernorm": True, "num_moe_experts": 8,
                   "moe_ffn_hidden_size": 32, "moe_router_topk": 2,
                   "moe_router_pre_softmax": False}
    run = {"model": {"transformer": transformer, "activation": "swiglu",
                     "position_embedding_type": "rope", "rotary_base": 1000000.0,
                     "share_embeddings_and_output_weights": False},
           "data": {"seq_length": 256}}
    _write_config(tmp_path, _architecture(None, run), None, "float32")
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, transformers.Qwen3MoeConfig)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.norm_topk_prob) == (8, 2, 32, True)
    section = read_architecture(tmp_path).model_section()
    assert {k: section[k] for k in transformer if k in section} == \
        {k: v for k, v in transformer.items() if k in section}
    del transformer["qk_layernorm"]
    with pytest.raises(ValueError, match="only Qwen3-MoE is mapped"):
        _architecture(None, run)
