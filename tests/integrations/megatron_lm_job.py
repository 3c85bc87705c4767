"""examples/megatron_lm_pretrain.py (a user's Megatron-LM launch script with this plugin), run
as torchrun runs it, with what Megatron-LM's train_step returns each iteration (the reduced
reports and the gradient norm) written down as it passes into $ADADPO_RECORD (JSON lines, by
the last rank), for tests/integrations/test_megatron_lm.py.

    torchrun --nproc_per_node 2 tests/integrations/megatron_lm_job.py <flags>
"""

import json
import os
import runpy
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "megatron_lm_pretrain.py"


def _recording(train_step):
    """Megatron-LM's train_step, its results written down as they pass (nothing changed)."""
    def wrapped(*args, **kwargs):
        result = train_step(*args, **kwargs)
        losses, skipped, grad_norm = result[0], result[1], result[5]
        if losses and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            from megatron.training import get_args

            record = {"iteration": get_args().curr_iteration + 1, "skipped": skipped,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      **{k: float(v) for k, v in losses.items()}}
            with open(os.environ["ADADPO_RECORD"], "a") as f:
                f.write(json.dumps(record) + "\n")
        return result

    return wrapped


if __name__ == "__main__":
    from megatron.training import training

    training.train_step = _recording(training.train_step)
    runpy.run_path(str(SCRIPT), run_name="__main__")
