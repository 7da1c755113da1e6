"""Multi-process training helpers: FSDP2 sharding plan and the inject-before-shard guard.

DDP needs nothing from lorakit: wrap the PeftModel after ``get_peft_model``. FSDP2 (``fully_shard``) turns
parameters into DTensors, so three things need care: what to shard (each transformer block, then the root),
injecting only before sharding (parameters added after ``fully_shard`` stay plain tensors that no collective
touches, so each rank trains its own copy and they silently diverge), and gathering the full adapter before
writing it in PEFT's format (``sharded_save.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import precision
from .compiling import repeated_blocks
from .errors import explain


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
    decoder's ``layers`` / ``h`` / ``blocks``; ``compiling.repeated_blocks``, here a list of one counts too),
    found without naming the architecture.
    """
    return [*repeated_blocks(model, min_blocks=1), model]


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
