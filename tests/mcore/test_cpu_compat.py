"""The CPU layer that runs megatron-core's schedules over gloo: idempotent, and it redirects."""


def test_cpu_layer_is_idempotent():
    from adadpo_megatron.mcore import cpu_compat

    first = cpu_compat.enable()
    second = cpu_compat.enable()
    assert cpu_compat.is_enabled()
    import megatron.core.pipeline_parallel.schedules as schedules
    import torch

    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
    assert first > 0 and second == 0, "a second call must find nothing left to redirect"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")


def test_modules_imported_after_enabling_are_redirected_too():
    """One call, whatever the import order: a megatron.core module first imported after
    enable() sees the CPU proxy (in a fresh interpreter, so that it really is imported
    after)."""
    import subprocess
    import sys

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
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
