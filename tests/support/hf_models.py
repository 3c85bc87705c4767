"""Tiny Hugging Face models, pairs and run configs for the tests that go through model.hf,
and the oracle: transformers' own forward of the same model."""

from __future__ import annotations

import copy
import json

import torch

from tests.support.tolerances import forward_depth
from tests.support.training import TINY

SEQ = 256
VOCAB, HIDDEN, FFN = 384, 64, 160  # make_hf_model's sizes (the experts are narrower: 32)

ARCHITECTURES = {
    "llama3": dict(model_type="llama", rope_theta=500000.0),
    "llama31": dict(model_type="llama", rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}),
    "llama32_tied": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0),
    "mistral": dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    # head_dim 24, not hidden / heads = 16: megatron-core's kv_channels must come from it
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, head_dim=24),
    # 4 experts of width 32, 2 per token: renormalised over the 2 (Qwen3-30B-A3B's routing),
    # and softmax over all 4 first (the transformers default)
    "qwen3_moe": dict(model_type="qwen3_moe", rope_theta=1000000.0, head_dim=24, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen3_moe_softmax_first": dict(model_type="qwen3_moe", rope_theta=1000000.0, head_dim=24,
                                    num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=False),
}


def make_hf_model(directory, name, seed=0, layers=2):
    """A tiny model of ``name``'s architecture, saved as save_pretrained writes it."""
    import transformers

    spec = dict(ARCHITECTURES[name])
    model_type = spec.pop("model_type")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
                    "qwen3_moe": transformers.Qwen3MoeConfig}
    config = config_class[model_type](
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-5, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:  # (transformers' experts are one [E, out, in] tensor)
                param.mul_(4.0)  # std 0.08: logits (and routing) far from uniform
            else:
                param.add_(0.1 * torch.randn(param.shape))  # norms and biases not all equal
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def hf_depth(layers=2):
    """Roundings to one token's log-prob in make_hf_model's model at SEQ (tolerances.py)."""
    return forward_depth(layers, HIDDEN, FFN, SEQ, VOCAB)


def make_tokenizer():
    """A word-level tokenizer of 300 tokens plus BOS and EOS (ids below the model's 384)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(300)}
    vocab.update({"<s>": 300, "</s>": 301})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def make_pairs(path, pairs=8, seed=0):
    """Pretokenized pairs of ~100-token prompts and responses (byte ids)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(pairs):
            ids = torch.randint(0, 256, (300,), generator=g).tolist()
            f.write(json.dumps({"prompt_input_ids": ids[:100], "chosen_input_ids": ids[100:200],
                                "rejected_input_ids": ids[200:300]}) + "\n")
    return str(path)


def hf_config(tmp, name, data, model=None, **overrides):
    """The tiny test run with its model section replaced by ``model`` (default model.hf)."""
    from adadpo_megatron.training.run_config import RunConfig

    raw = copy.deepcopy(TINY)
    raw["model"] = model if model is not None else {"hf": str(tmp / name)}
    settings = {"data.path": data, "data.tokenizer": "byte", "data.seq_length": SEQ,
                "data.max_prompt_length": 128, "data.packing": "none",
                "train.output_dir": str(tmp / f"run_{name}"), **overrides}
    for key, value in settings.items():
        section, field = key.split(".", 1)
        raw.setdefault(section, {})[field] = value
    return RunConfig.from_dict(raw)


def policy_token_logps(trainer):
    """(per-token log-probs [4, S] of the trainer's policy through this project's path, the
    padded batch of the first 4 pairs they are of)."""
    from adadpo_megatron import vocab_parallel_logprobs  # megatron-core's TP group
    from adadpo_megatron.data.micro_batches import collate
    from adadpo_megatron.mcore.forward_step import _model_forward

    batch = collate(trainer.run.data.dataset, torch.arange(4))
    model = trainer.model[0].module
    model.eval()
    with torch.no_grad():
        return vocab_parallel_logprobs(_model_forward(model, batch), batch["labels"]), batch


def transformers_token_logps(directory, batch):
    """The oracle: transformers' forward of the model in ``directory``, log_softmax, gather."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.float()
    labels = batch["labels"].clamp(min=0)[..., None]
    return torch.log_softmax(logits, -1).gather(-1, labels).squeeze(-1), logits
