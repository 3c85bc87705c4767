"""The AdaDPO loss from vocab-sharded, sequence-sharded logits, end to end, on CPU.

    torchrun --nproc_per_node 2 examples/loss_on_sharded_logits.py --tp 2
    torchrun --nproc_per_node 2 examples/loss_on_sharded_logits.py --cp 2
    python examples/loss_on_sharded_logits.py

Every rank builds the same random "model output" for 4 preference pairs (chosen rows first,
rejected rows second, as in a megatron micro-batch), keeps its vocabulary block (--tp) or its
load-balanced sequence chunks (--cp), and computes per-token log-probs, per-sequence sums and
the AdaDPO loss. The loss printed is the same whatever the layout.
"""

import argparse
import os

import torch
import torch.distributed as dist

from adadpo_megatron import (
    LossConfig,
    preference_loss,
    sequence_logprobs,
    vocab_parallel_logprobs,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp * args.cp != world:
        raise SystemExit(f"--tp({args.tp}) * --cp({args.cp}) != WORLD_SIZE({world})")
    group = None
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank = dist.get_rank() if world > 1 else 0

    pairs, seq, vocab = 4, 32, 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * pairs, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    loss_mask = torch.zeros(2 * pairs, seq)
    loss_mask[:, 8:] = 1  # the first 8 tokens are the prompt
    ref_logits = logits + 0.1 * torch.randn(logits.shape, generator=g)

    def shard(t, vocab_dim=False):
        if args.tp > 1 and vocab_dim:
            block = vocab // args.tp
            return t[..., rank * block:(rank + 1) * block]
        if args.cp > 1:  # megatron-core's load-balanced layout: chunks r and 2cp-1-r
            chunks = t.chunk(2 * args.cp, dim=1)
            return torch.cat([chunks[rank], chunks[2 * args.cp - 1 - rank]], dim=1)
        return t

    tp_group = group if args.tp > 1 else None
    cp_group = group if args.cp > 1 else None

    def sums(model_logits):
        token_logps = vocab_parallel_logprobs(shard(model_logits, vocab_dim=True), shard(labels),
                                              tp_group=tp_group)
        return sequence_logprobs(token_logps, shard(loss_mask), cp_group=cp_group)

    policy, counts = sums(logits)
    with torch.no_grad():
        reference, _ = sums(ref_logits)
    losses, metrics = preference_loss(policy[:pairs], policy[pairs:], counts[:pairs],
                                      counts[pairs:], reference[:pairs], reference[pairs:],
                                      config=LossConfig(beta=0.1))
    if rank == 0:
        print(f"tp={args.tp} cp={args.cp}: loss {losses.mean().item():.6f}, "
              f"coef_mean {metrics['adadpo/coef_mean'].item():.4f}, "
              f"grad_ratio {metrics['adadpo/grad_ratio'].item():.4f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
