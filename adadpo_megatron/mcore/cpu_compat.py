"""Run megatron-core's real schedules, layers and optimizer on CPU over gloo (dev and CI mode).

megatron-core creates tensors with ``device="cuda"``, asks ``torch.cuda.current_device()``,
and uses CUDA streams, events and synchronisation throughout its schedules, p2p
communication, DDP grad buffers, optimizers and utilities. ``enable()`` replaces the
``torch`` that each loaded ``megatron.core`` module sees with a thin proxy that

- maps ``device="cuda"`` (or an index) to the CPU in tensor factories,
- answers ``torch.cuda.current_device()`` with the CPU device,
- turns ``synchronize``, streams and events into no-ops;

and, outside the proxy,

- makes the CUDA RNG tracker's ``fork()`` a no-op (dropout then draws from the default CPU
  generator; the CPU recipes use no dropout),
- keeps ``tensor.cuda()`` on the CPU inside ``LanguageModule.setup_embeddings_and_output_layer``
  (tied embeddings with pipeline parallelism copy the output layer's weight there) and inside
  ``get_pos_emb_on_this_cp_rank`` (the rotary table's context-parallel chunks), and drops
  ``pin_memory`` from tensor factories,
- replaces ``clip_grad_by_total_norm_fp32`` as the optimizer sees it with the same maths
  minus its ``'torch.cuda.FloatTensor'`` assertion (we clip here rather than patching the
  check inside megatron's function; the distributed optimizer, which asserts the same
  type string elsewhere, is refused on CPU by the trainer's config check),
- gives the MoE all-to-all token dispatcher its split sizes as numpy arrays, as its
  device-to-host copy does on a GPU (``maybe_move_tensor_to_cpu`` only converts CUDA tensors,
  and ``all_to_all_single`` refuses tensors as split sizes), so expert parallelism runs over
  gloo,
- runs megatron-core's fused SwiGLU functions (``fusions.fused_bias_swiglu``) as written:
  ``megatron.core.jit`` wraps them in ``torch.compile``, which on the CPU needs a C++
  compiler and seconds per process and shape; their autograd functions, which keep less for
  the backward than the unfused MLP (docs/CPU.md), stay.

Megatron-LM's training loop (``megatron.training``, as the megatron-core wheel ships it) gets
a proxy of its own, whose ``torch.cuda`` is one device that is always there and holds no
memory (the loop asserts CUDA, counts devices before building its groups, pins its rank's
device and reports memory), and its ``get_model`` keeps ``module.cuda()`` on the CPU.

Everything else (collectives, autograd, the model code) is untouched. The layer switches
on only when no GPU is in use (``enable()`` raises otherwise) and is idempotent. Its effect
does not depend on import order: modules loaded before the call are redirected by it, and
those loaded after it as they are imported (an import hook on ``megatron.core`` and
``megatron.training``). Checked
against megatron-core 0.19.2 with torch 2.14.1 (see ``CHECKED_MEGATRON_CORE_VERSIONS``).
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings

import torch

CHECKED_MEGATRON_CORE_VERSIONS = ("0.19.2",)

_TENSOR_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "eye", "full", "full_like", "linspace",
    "ones", "ones_like", "rand", "randint", "randn", "tensor", "zeros", "zeros_like",
)


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream(_NullEvent):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as megatron-core sees it on a CPU-only run."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def empty_cache():
        pass

    # the CUDA RNG tracker's states (Megatron-LM's seeding adds them; fork() is a no-op here)
    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)


class _CpuTrainingCuda(_CpuCuda):
    """``torch.cuda`` as Megatron-LM's training loop (``megatron.training``) sees it on a
    CPU-only run: one device that is always there, holding no memory. The loop asserts that
    CUDA is available, sets up model parallelism only where it counts a device, pins the
    device of its rank and reports memory after each logged step."""

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def set_device(*args, **kwargs):
        pass

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def memory_stats(*args, **kwargs):
        return {}

    @staticmethod
    def get_device_properties(*args, **kwargs):
        # architecture 0: no GPU generation's exemptions apply
        return types.SimpleNamespace(name="cpu", major=0, minor=0, total_memory=0,
                                     multi_processor_count=0)

    @staticmethod
    def get_device_capability(*args, **kwargs):
        return (0, 0)

    @staticmethod
    def get_device_name(*args, **kwargs):
        return "cpu"


class _CpuTorch(types.ModuleType):
    """``torch`` as megatron-core sees it on a CPU-only run: everything else is forwarded."""

    def __init__(self, cuda: types.ModuleType = None):
        super().__init__("torch")
        self.cuda = cuda if cuda is not None else _CpuCuda()
        for name in _TENSOR_FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)  # pinning asks for a CUDA driver
            return factory(*args, **kwargs)

        wrapped.__name__ = factory.__name__
        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()
_CPU_TORCH_TRAINING = _CpuTorch(_CpuTrainingCuda())
# the packages whose modules get a proxy, and which
_PROXIES = (("megatron.core", _CPU_TORCH), ("megatron.training", _CPU_TORCH_TRAINING))


def _proxy_for(name: str):
    for prefix, proxy in _PROXIES:
        if name == prefix or name.startswith(prefix + "."):
            return proxy
    return None


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 without its CUDA type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            if grad.dtype != torch.float32:
                raise TypeError(f"gradient clipping expects float32 gradients, got {grad.dtype}")
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _tensor_cuda_stays_on_cpu():
    """``tensor.cuda()`` returns the tensor itself while inside (a CPU-only run)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _on_cpu(method):
    """``method`` with ``tensor.cuda()`` kept on the CPU for the length of the call."""
    if getattr(method, "_adadpo_cpu", False):
        return method

    def wrapped(*args, **kwargs):
        with _tensor_cuda_stays_on_cpu():
            return method(*args, **kwargs)

    wrapped._adadpo_cpu = True
    wrapped.__name__ = method.__name__
    return wrapped


def _redirect(module) -> bool:
    """Gives a megatron.core or megatron.training module its CPU torch proxy; whether it had
    the real torch."""
    proxy = _proxy_for(module.__name__)
    if proxy is not None and getattr(module, "torch", None) is torch:
        module.torch = proxy
        for patch in _MODULE_PATCHES.get(module.__name__, ()):
            patch(module)
        return True
    return False


def _training_loop_on_cpu(module) -> None:
    """Megatron-LM's loop moves each model chunk with ``module.cuda()`` after building it."""
    module.get_model = _on_cpu(module.get_model)


def _rotary_chunks_on_cpu(module) -> None:
    """Under context parallelism the rotary table is cut to the rank's chunks by
    ``get_pos_emb_on_this_cp_rank``, which copies the chunk indices with ``.cuda()`` (the
    rotary module holds its own name for the function)."""
    module.get_pos_emb_on_this_cp_rank = _on_cpu(module.get_pos_emb_on_this_cp_rank)


# {module: what else it needs on CPU}, applied once, with its proxy
_MODULE_PATCHES = {
    "megatron.training.training": (_training_loop_on_cpu,),
    "megatron.core.models.common.embeddings.rope_utils": (_rotary_chunks_on_cpu,),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (_rotary_chunks_on_cpu,),
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": (_rotary_chunks_on_cpu,),
}


class _RedirectingLoader:
    """A module's own loader, then the redirect, for megatron.core modules imported after
    ``enable()``."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _redirect(module)

    def __getattr__(self, name):  # get_code, get_source, is_package, ...: the loader's own
        return getattr(self._loader, name)


class _RedirectOnImport:
    """A sys.meta_path finder: finds megatron.core and megatron.training modules with the
    other finders and wraps their loaders in _RedirectingLoader."""

    def find_spec(self, name, path=None, target=None):
        if _proxy_for(name) is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RedirectingLoader(spec.loader)
                return spec
        return None


def enable() -> int:
    """Applies the CPU redirects to every loaded megatron.core module, and to every one
    imported from now on.

    Returns:
        how many loaded modules it newly redirected (0 when called again).

    Raises:
        RuntimeError: when a GPU is visible; this layer is for CPU-only runs.
    """
    if torch.cuda.is_available():
        raise RuntimeError("adadpo_megatron.mcore.cpu_compat is for CPU-only runs, but a GPU is "
                           "visible; megatron-core runs on GPUs as it is")
    import megatron.core
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import token_dispatcher

    version = getattr(megatron.core, "__version__", "unknown").split("+")[0]
    if version not in CHECKED_MEGATRON_CORE_VERSIONS:
        warnings.warn(f"adadpo_megatron.mcore.cpu_compat was checked against megatron-core "
                      f"{', '.join(CHECKED_MEGATRON_CORE_VERSIONS)}, not {version}", stacklevel=2)
    if not any(isinstance(finder, _RedirectOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RedirectOnImport())
    patched = sum(_redirect(module) for name, module in list(sys.modules.items())
                  if _proxy_for(name) is not None)
    megatron_random.CudaRNGStatesTracker.fork = _no_fork
    _run_uncompiled(fused_bias_swiglu)
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    # tied embeddings under pipeline parallelism: the last stage's copy is moved with
    # weight.data.cuda() before the first/last-stage all-reduce
    LanguageModule.setup_embeddings_and_output_layer = _on_cpu(
        LanguageModule.setup_embeddings_and_output_layer)
    return patched


def _run_uncompiled(module) -> None:
    """``module``'s functions that megatron.core.jit wraps in torch.compile, as written: on
    the CPU, torch.compile needs a C++ compiler and costs seconds per process and shape (its
    autograd functions, which keep less for backward, are kept)."""
    for name, function in list(vars(module).items()):
        original = getattr(function, "_torchdynamo_orig_callable", None)
        if original is not None:
            setattr(module, name, original)


def _no_fork(self, name=None):
    return contextlib.nullcontext()


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron-core's moe_utils.maybe_move_tensor_to_cpu for tensors already on the CPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def is_enabled() -> bool:
    from megatron.core.tensor_parallel import random as megatron_random

    return megatron_random.CudaRNGStatesTracker.fork is _no_fork
