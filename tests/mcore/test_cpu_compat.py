"""The CPU layer that runs megatron-core's schedules over gloo: idempotent, and it redirects."""

from tests.support.fresh_interpreter import assert_runs_clean


def test_cpu_layer_is_idempotent():
    """In a fresh interpreter: in this one an earlier test may have enabled the layer
    already, and "the first call redirects something" would depend on the order of the
    tests (issue 24)."""
    code = (
        "import torch\n"
        "from adadpo_megatron.mcore import cpu_compat\n"
        "import megatron.core.pipeline_parallel.schedules as schedules\n"
        "assert not cpu_compat.is_enabled()\n"
        "first = cpu_compat.enable()\n"
        "second = cpu_compat.enable()\n"
        "assert cpu_compat.is_enabled()\n"
        "assert schedules.torch.cuda.current_device() == torch.device('cpu')\n"
        "assert schedules.torch.zeros(2, device='cuda').device.type == 'cpu'\n"
        "assert first > 0 and second == 0, (first, second)\n"
        "assert schedules.torch.cuda.current_device() == torch.device('cpu')\n"
        "print('ok')\n")
    assert_runs_clean(code)


def test_modules_imported_after_enabling_are_redirected_too():
    """One call, whatever the import order: a megatron.core module first imported after
    enable() sees the CPU proxy (in a fresh interpreter, so that it really is imported
    after)."""
    code = (
        "import sys, torch\n"
        "from adadpo_megatron import cpu_compat\n"
        "cpu_compat.enable()\n"
        "name = 'megatron.core.dist_checkpointing.strategies.filesystem_async'\n"
        "assert name not in sys.modules, 'not a later import'\n"
        "import megatron.core.dist_checkpointing.strategies.filesystem_async as late\n"
        "assert late.torch.cuda.current_device() == torch.device('cpu')\n"
        "import megatron.core.models.gpt.gpt_model as gpt_model\n"
        "assert gpt_model.torch.zeros(1, device='cuda').device.type == 'cpu'\n"
        "assert cpu_compat.enable() == 0\n"
        "print('ok')\n")
    assert_runs_clean(code)
