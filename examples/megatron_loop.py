"""AdaDPO inside a megatron-core training loop you already have.

    torchrun --nproc_per_node 2 examples/megatron_loop.py --tp 2     # or --pp 2, or neither
    python examples/megatron_loop.py                                  # one process

Only three things change in a megatron-core loop: the micro-batches hold whole pairs
(chosen rows first, rejected rows second, with labels, loss_mask and, for reference-based
losses, ref_logps), the forward_step_func is PreferenceForwardStep, and the model config
has calculate_per_token_loss=True so megatron divides the gradient by the global pair count.
Here the model, DDP, optimizer and data are built by hand with megatron-core's own classes
(with megatron's default initialisation, which depends on the pipeline layout, so --pp 2
starts from other weights; adadpo-train's canonical initialisation does not);
on a machine without a GPU the CPU layer stands in for CUDA.
"""

import argparse
import os

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("gloo")

    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from adadpo_megatron import (
        ByteTokenizer,
        DataSettings,
        LossConfig,
        PreferenceForwardStep,
        ReferenceForwardStep,
        collect_reference,
        cpu_compat,
        load_preference_data,
        reduce_reports,
        step_micro_batches,
    )

    if not torch.cuda.is_available():
        cpu_compat.enable()
    parallel_state.initialize_model_parallel(args.tp, args.pp)
    torch.manual_seed(0)

    # --- your model, as you build it today (calculate_per_token_loss=True is the one change)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        calculate_per_token_loss=True)

    def gpt():
        return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                        vocab_size=384, max_sequence_length=32,
                        pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage(),
                        position_embedding_type="rope")

    policy = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt())
    reference = gpt()
    reference.load_state_dict(policy.module.state_dict())  # reference = initial policy
    reference.requires_grad_(False)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [policy])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    # --- pairs as micro-batches: 4 pairs a step in 2 micro-batches of 2
    here = os.path.dirname(os.path.abspath(__file__))
    dataset, _ = load_preference_data(os.path.join(here, "data", "reverse_pairs.jsonl"),
                                      ByteTokenizer(),
                                      DataSettings(seq_length=32, max_prompt_length=16))
    dp_group = parallel_state.get_data_parallel_group()
    forward_backward = get_forward_backward_func()
    policy_step = PreferenceForwardStep(LossConfig(beta=0.1))
    reference_step = ReferenceForwardStep()

    for step in range(args.steps):
        batches = step_micro_batches(dataset, step, global_batch_size=4, micro_batch_size=2,
                                     dp_rank=parallel_state.get_data_parallel_rank(),
                                     dp_size=parallel_state.get_data_parallel_world_size(),
                                     seed=0)
        common = dict(num_microbatches=len(batches), seq_length=32, micro_batch_size=4)
        with torch.no_grad():  # the resident reference: same code path, forward only
            ref_reports = forward_backward(forward_step_func=reference_step,
                                           data_iterator=iter(batches), model=reference,
                                           forward_only=True, **common)
        if parallel_state.is_pipeline_last_stage():
            collect_reference(ref_reports, batches)
        policy.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=policy_step, data_iterator=iter(batches),
                                   model=policy, forward_only=False, **common)
        _, grad_norm, _ = optimizer.step()
        if parallel_state.is_pipeline_last_stage():
            metrics = reduce_reports(reports, dp_group)
            if parallel_state.get_tensor_model_parallel_rank() == 0 and \
                    parallel_state.get_data_parallel_rank() == 0:
                print(f"step {step}: loss {metrics['loss']:.6f} "
                      f"coef_mean {metrics['adadpo/coef_mean']:.4f} grad_norm {grad_norm:.4f}",
                      flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
