"""AdaDPO in Megatron-LM's own training loop: pretrain() with this plugin's forward_step.

Needs a Megatron-LM checkout on PYTHONPATH (megatron.training is not part of megatron-core)
and a GPU; the tests only compile this file. Launch like any Megatron-LM script, with the
model's usual arguments plus:

    torchrun --nproc_per_node 8 examples/megatron_lm_pretrain.py \
        --calculate-per-token-loss --micro-batch-size 1 --global-batch-size 128 \
        --seq-length 2048 --load /ckpt/llama3-8b-instruct-mcore --tokenizer-type NullTokenizer \
        ... (Llama-3 architecture arguments, --bf16, --lr 5e-7, --lr-decay-style cosine, ...)
    ADADPO_DATA=/data/pairs.jsonl ADADPO_TOKENIZER=/models/Meta-Llama-3-8B-Instruct \
    ADADPO_REFERENCE=/data/pairs.jsonl.reference.pt  (written by adadpo-precompute-reference)

Micro-batch and global batch sizes count pairs. --calculate-per-token-loss makes Megatron-LM
divide the gradient by the pair count that the loss function returns, so the gradient is that
of the mean over the global batch; its loop averages the reported [sum, count] metrics.
"""

import os

import torch


def model_provider(pre_process=True, post_process=True, vp_stage=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = core_transformer_config_from_args(args)
    config.calculate_per_token_loss = True
    return GPTModel(config=config,
                    transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
                    vocab_size=args.padded_vocab_size, max_sequence_length=args.seq_length,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=False,
                    position_embedding_type="rope", rotary_base=args.rotary_base,
                    vp_stage=vp_stage)


def datasets_provider(train_val_test_num_samples):
    """PairDataset items; Megatron-LM's loader stacks them into [m, 2, S] micro-batches."""
    from megatron.training import get_args

    from adadpo_megatron import (
        DataSettings,
        PairDataset,
        build_tokenizer,
        load_preference_data,
        split_held_out,
    )

    args = get_args()
    settings = DataSettings(format="auto", seq_length=args.seq_length,
                            max_prompt_length=args.seq_length * 7 // 8, skip_invalid=True)
    data, report = load_preference_data(os.environ["ADADPO_DATA"],
                                        build_tokenizer(os.environ["ADADPO_TOKENIZER"]),
                                        settings)
    reference = torch.load(os.environ["ADADPO_REFERENCE"], weights_only=True)["logps"]
    train, held_out = split_held_out(data, 0.01, seed=args.seed)
    return PairDataset(train, reference), PairDataset(held_out, reference), None


datasets_provider.is_distributed = True


if __name__ == "__main__":
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from adadpo_megatron import LossConfig, PreferenceForwardStep

    pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder,
             PreferenceForwardStep(LossConfig(loss_type="dpo", beta=0.01, clip=2.0)))
