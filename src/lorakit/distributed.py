"""Multi-process training helpers: FSDP2 sharding plan, the inject-before-shard guard, full adapter gather.

DDP needs nothing from lorakit: wrap the PeftModel after ``get_peft_model``. FSDP2 (``fully_shard``) turns
parameters into DTensors, so three things need care: what to shard (each transformer block, then the root),
injecting only before sharding (parameters added after ``fully_shard`` stay plain tensors that no collective
touches, so each rank trains its own copy and they silently diverge), and gathering the full adapter before
writing it in PEFT's format.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any
from typing import TYPE_CHECKING, cast  # (a line of its own: the app branch edits the imports above)

import torch
from torch import Tensor, nn

from .codec import PREFIX
from . import precision
from .errors import explain
if TYPE_CHECKING:
    from .model import PeftModel


def _loaded(module: str, name: str) -> Any:
    """``module.name`` once ``module`` is imported, else ``()`` (``isinstance(x, ())`` is False).

    No FSDP2 module or DTensor can exist before torch.distributed.fsdp / .tensor is imported (by the user, by
    ``shard``, or never on torch builds without distributed support), so lorakit does not import them itself:
    torch.distributed.fsdp alone was about half a second of ``import lorakit``.
    """
    return getattr(sys.modules.get(module), name, ())


def is_sharded(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> bool:
    """True when any submodule of ``model`` (or of ``modules``, its submodules if already listed) is an FSDP2
    module or holds a DTensor parameter."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    if not fsdp_module and not dtensor:
        return False
    return any(isinstance(m, fsdp_module) or any(isinstance(p, dtensor) for p in m._parameters.values())
               for m in (model.modules() if modules is None else modules))


def check_not_sharded(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> None:
    """Refuse to inject adapters into a model already passed to ``fully_shard``.

    Raises:
        ValueError: ``model`` holds FSDP2 modules or DTensor parameters.
    """
    if is_sharded(model, modules):
        raise ValueError(explain(
            "inject adapters before fully_shard: parameters added after sharding stay plain and silently "
            "diverge across ranks", where=type(model).__name__, got="a model already sharded by FSDP2",
            fix="call get_peft_model / add_adapter / load_adapter on the unsharded model, then shard it"))


def fsdp2_wrap_plan(model: nn.Module) -> list[nn.Module]:
    """The modules to ``fully_shard``, innermost first: each transformer block, then ``model`` itself.

    The blocks are the elements of the largest ``nn.ModuleList`` whose elements all share one class (a
    decoder's ``layers`` / ``h`` / ``blocks``), found without naming the architecture.
    """
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return [*best, model]


def shard(peft_model: nn.Module, mixed_precision: str | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """Apply ``fully_shard(module, **fsdp_kwargs)`` along ``fsdp2_wrap_plan``; returns ``peft_model``.

    Without a ``mesh`` in ``fsdp_kwargs``, a CPU model gets a 1-D CPU mesh over the default process group
    (``fully_shard``'s own default mesh needs an accelerator). ``mixed_precision="bf16"`` computes in
    bfloat16 and reduces gradients in float32 (``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)``); the sharded parameters, optimizer state and saved adapter stay float32.
    It needs a CUDA GPU with bf16 support, or a CPU with bfloat16 matmul instructions (AMX-BF16 or
    AVX512-BF16: there a bf16 matmul runs about 6x faster than float32, precision.py; elsewhere it is
    emulated and slower); ``None`` or ``"no"`` leaves precision alone.

    Raises:
        ValueError: ``mixed_precision`` is not None / "no" / "bf16", is "bf16" for a model on a CUDA
            device without bf16 support or a CPU without bf16 matmul instructions, or is given together
            with ``mp_policy``.
        RuntimeError: torch lacks FSDP2 or no process group is initialised.
    """
    if mixed_precision not in (None, "no", "bf16"):
        raise ValueError(explain("unknown mixed_precision", got=mixed_precision, fix='use None, "no" or "bf16"'))
    if mixed_precision == "bf16":
        if "mp_policy" in fsdp_kwargs:
            raise ValueError(explain("mixed_precision and mp_policy both given", got="both",
                                     fix="pass one: mixed_precision='bf16' or your own mp_policy"))
        device = next(peft_model.parameters()).device
        supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else \
            device.type == "cpu" and bool(precision.cpu_bf16_flags())
        if not supported:
            raise ValueError(explain(
                "FSDP2 bf16 mixed precision needs a CUDA device with bf16 support or a CPU with bf16 matmul "
                "instructions", where=f"model on {device.type}",
                got=f"a CPU without {' or '.join(precision.BF16_FLAGS)}, where bf16 matmuls are emulated and "
                    "several times slower than float32" if device.type == "cpu"
                else f"a {device.type} device without bf16 support",
                fix="train in float32 (mixed_precision=None / --mixed-precision no), or move the model to a "
                    "bf16-capable device before shard"))
    try:
        from torch.distributed.fsdp import fully_shard
        ready = torch.distributed.is_initialized()
    except ImportError:  # pragma: no cover - torch built without distributed support
        ready = False
    if not ready:
        raise RuntimeError(explain("cannot shard", got="no FSDP2 in this torch or no process group",
                                   fix="run under torchrun and call torch.distributed.init_process_group"))
    if mixed_precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        fsdp_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if "mesh" not in fsdp_kwargs and next(peft_model.parameters()).device.type == "cpu":
        from torch.distributed.device_mesh import init_device_mesh
        fsdp_kwargs["mesh"] = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for module in fsdp2_wrap_plan(peft_model):
        fully_shard(module, **fsdp_kwargs)
    return peft_model


def full_adapter_state_dict(peft_model: nn.Module, adapter_name: str = "default",
                            save_embedding_layers: bool | str = "auto") -> dict[str, Tensor]:
    """PEFT file-keyed tensors of ``adapter_name``, gathered whole; every rank must call it.

    Trainable tensors come from ``get_model_state_dict(full_state_dict, cpu_offload, ignore_frozen_params)``,
    which puts them, full and on CPU, on rank 0 only; frozen ones the adapter still saves (an inactive
    adapter, saved embedding layers) are gathered one by one with ``DTensor.full_tensor``, in the same
    order on every rank. Model keys are those of the unsharded model, so io's codec maps them unchanged.
    Returns the full dict on rank 0 and an empty one elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    from . import io

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    gathered = get_model_state_dict(peft_model, options=options)
    user_model = cast("PeftModel", peft_model).base_model.model
    local = {PREFIX + k: v for k, v in user_model.state_dict(keep_vars=True).items()}
    trainable = {k for k, v in local.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    state: dict[str, Tensor] = {}
    for key in io.adapter_model_keys(peft_model, adapter_name, save_embedding_layers):
        if key in trainable:
            if key in gathered:
                state[key] = cast(Tensor, gathered[key])  # a full model state dict holds tensors only
            continue
        value = local[key].detach()
        state[key] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
    if torch.distributed.get_rank() != 0:
        return {}
    return io.adapter_state_dict(peft_model, adapter_name, save_embedding_layers, state=state)


def save_sharded(peft_model: nn.Module, save_directory: Any, selected_adapters: list[str] | None,
                 safe_serialization: bool, save_embedding_layers: bool | str, is_main_process: bool,
                 path_initial_model_for_weight_conversion: str | None = None) -> None:
    """``save_pretrained`` for a sharded model: every rank gathers, rank 0 writes (if ``is_main_process``).

    Raises:
        ValueError: an unknown adapter in ``selected_adapters`` (from io.save_adapters, on rank 0).
        NotImplementedError: ``path_initial_model_for_weight_conversion`` on a sharded model.
    """
    from . import io

    if path_initial_model_for_weight_conversion is not None:
        raise NotImplementedError(explain(
            "path_initial_model_for_weight_conversion is not supported on an FSDP2-sharded model",
            fix="save the residual-init adapter unconverted, then convert it in one process"))

    configs = cast("PeftModel", peft_model).peft_config
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    names = [n for n in names if n in configs]  # unknown names: io.save_adapters reports them
    gathered = {n: full_adapter_state_dict(peft_model, n, save_embedding_layers) for n in names}
    if is_main_process and torch.distributed.get_rank() == 0:
        io.save_adapters(peft_model, save_directory, selected_adapters, safe_serialization, save_embedding_layers,
                         gathered=gathered)
