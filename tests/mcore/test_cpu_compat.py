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
