"""Hot-swapping: replace an adapter's weights in place, so a ``torch.compile``d model runs the new adapter without
recompiling (PEFT's ``peft.utils.hotswap``, same names, arguments and errors).

A compiled graph is specialised on the shapes of the factors and on Python numbers it reads, such as the scaling
``s = alpha / r``. So a swap that keeps shapes and reads no new number compiles nothing:

    A (r, in) ← A',  B (out, r) ← B'                    copied into the same tensors (``copy_``)
    s ← s'                                              written into a 0-d tensor (``fill_``) once the scalings
                                                        are tensors (``prepare_model_for_compiled_hotswap``)

Adapters of different ranks fit one shape by zero padding to a ``target_rank`` R ≥ r:

    A_pad = [A; 0] (R, in),  B_pad = [B, 0] (out, R)  ⇒  B_pad A_pad = B A      (the padded rows / columns cancel)

so a rank-r' adapter (r' ≤ R) is copied into the leading block and the rest zeroed. Layers the old adapter has
and the new one lacks are zeroed (ΔW = 0). The config keys that change the forward in other ways
(``CONFIG_KEYS_TO_CHECK``: rsLoRA, dropout, alpha_pattern, DoRA) must agree.
"""

from __future__ import annotations

import os
import warnings
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from .codec import decode, layout_of, parse_key, with_adapter_name
from .config import LoraConfig
from .io import load_peft_weights, read_config
from .layer import LoraLayer, named_lora_layers
from .load_options import LoadOptions
from .targeting import layer_spec
from .tuner import LoraModel

if TYPE_CHECKING:
    from .model import PeftModel

CONFIG_KEYS_TO_CHECK = {"LORA": ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", False))


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _scalings_to_tensors(layers: list[LoraLayer]) -> None:
    """s (a Python float, specialised by the compiler) -> a 0-d float32 tensor on the layer's device."""
    for layer in layers:
        if layer._variants:
            raise NotImplementedError(
                f"prepare_model_for_compiled_hotswap: adapter(s) {sorted(layer._variants)} of lora.{layer.kind.name} "
                "run through a variant (DoRA, BD-LoRA) whose fused kernels take the scaling as a number; lorakit "
                "does not prepare them for compiled hot-swapping. Hot-swap without preparing (same rank and alpha), "
                "or use plain LoRA adapters")
        device = layer.weight.device if hasattr(layer.base_layer, "weight") else None
        scalings: dict[str, Any] = layer.scaling  # float, or from here on a 0-d tensor (layer.py reads both)
        for name, value in scalings.items():
            if not isinstance(value, Tensor):
                scalings[name] = torch.tensor(float(value), device=device)


def _pad(factor: nn.Module, target_rank: int, rank_dim: int, groups: int = 1) -> None:
    """Zero-pad a factor module's weight along its rank dimension (0 for A, 1 for B) to ``target_rank``, in place.

    For a conv base of ``groups`` g, B is grouped: its weight holds r/g rank channels per group, and A's rank rows
    come in g blocks of r/g that B's groups read in turn; each block moves to the start of its padded block.

    Raises:
        ValueError: the factor's rank is already larger than ``target_rank`` (PEFT's sentence).
    """
    weight = cast(Tensor, factor.weight)  # a Linear / Conv factor
    per_group = rank_dim == 1 and groups > 1  # B of a grouped conv: its weight holds r/g rank channels
    rank = weight.shape[rank_dim] * (groups if per_group else 1)
    if rank == target_rank:
        return
    if rank > target_rank:
        raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                         f"({rank}). This is not possible.")
    shape = list(weight.shape)
    shape[rank_dim] = target_rank // groups if per_group else target_rank
    padded = weight.new_zeros(shape)
    _copy_rank_blocks(padded, weight.detach(), rank_dim, groups if rank_dim == 0 else 1)
    factor.weight = nn.Parameter(padded, requires_grad=weight.requires_grad)
    sizes = ("out_features", "in_features") if isinstance(factor, nn.Linear) else ("out_channels", "in_channels")
    setattr(factor, sizes[rank_dim], target_rank)  # the size the rank dimension is: A's output, B's input


def _copy_rank_blocks(destination: Tensor, source: Tensor, rank_dim: int, blocks: int) -> None:
    """destination (zeros) ← source, block j of the rank dimension at the start of destination's block j."""
    width, source_width = destination.shape[rank_dim] // blocks, source.shape[rank_dim] // blocks
    for j in range(blocks):
        destination.narrow(rank_dim, j * width, source_width).copy_(source.narrow(rank_dim, j * source_width,
                                                                                  source_width))


def _pad_layers(layers: list[LoraLayer], target_rank: int) -> bool:
    """Pad every Linear / Conv factor pair (embeddings keep their rank, as in PEFT); True if any layer was seen.

    Raises:
        ValueError: a grouped conv whose groups do not divide ``target_rank`` (PEFT's sentence).
    """
    found = False
    for layer in layers:
        if layer.kind.embedding:
            continue
        groups = getattr(layer.base_layer, "groups", 1)
        if target_rank % groups:
            raise ValueError(f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, "
                             f"but the target rank is not divisible by {groups}. Please choose a target rank that is "
                             f"divisible by {groups}.")
        for name in layer.lora_A:
            _pad(layer.lora_A[name], target_rank, 0, groups)
            _pad(layer.lora_B[name], target_rank, 1, groups)
        found = True
    return found


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: LoraConfig | dict[str, LoraConfig] | None = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Make the loaded adapter swappable without recompiling: scalings become 0-d tensors and, with
    ``target_rank``, the Linear / Conv factors are zero-padded to that rank (module docstring). Call it after the
    first adapter is loaded and before ``torch.compile``. ``config`` (one or a dict): its ``r`` and every
    ``rank_pattern`` value are set to ``target_rank`` in place, as PEFT does. ``layer.r`` keeps the trained rank.

    Raises:
        ValueError: the model is compiled already (``check_compiled="error"``), an unknown ``check_compiled``, no
            adapter layer, or a factor of rank above ``target_rank``.
        NotImplementedError: a variant adapter (DoRA, BD-LoRA) or a grouped conv.
    """
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.", stacklevel=2)
        elif check_compiled != "ignore":
            raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                             "instead.")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    _scalings_to_tensors(layers)
    if target_rank is not None:
        _pad_layers(layers, target_rank)
    if not config or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        rank_pattern = lora_config.rank_pattern or {}  # the config's own dict (None: nothing to set)
        for key in rank_pattern:
            rank_pattern[key] = target_rank


def check_hotswap_configs_compatible(config0: LoraConfig, config1: LoraConfig) -> None:
    """Refuse two configs whose swap would leave the forward wrong (``CONFIG_KEYS_TO_CHECK``).

    Raises:
        ValueError: different PEFT types, a type other than LoRA, or a checked key that differs (PEFT's wording).
    """
    type0, type1 = (str(getattr(c.peft_type, "value", c.peft_type)) for c in (config0, config1))
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK)} but {type0} was passed.")
    values0, values1 = config0.to_dict(), config1.to_dict()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        if values0.get(key) != values1.get(key):
            raise ValueError(f"Configs are incompatible: for {key}, {values0.get(key)} != {values1.get(key)}")


def _copy_into(old: Tensor, new: Tensor, key: str, groups: int = 1) -> None:
    """old ← new in place; a smaller rank fills the leading block of a zeroed ``old`` (module docstring), or of
    each of A's ``groups`` rank blocks for a grouped conv."""
    new = new.to(device=old.device, dtype=old.dtype)
    if old.shape == new.shape:
        old.data.copy_(new)
        return
    smaller = old.dim() == new.dim() and all(o >= n for o, n in zip(old.shape, new.shape))
    if not smaller:  # a larger adapter: the tensor takes the new shape (a compiled model recompiles, as in PEFT)
        old.data = new.clone()
        return
    if old.dim() not in (2, 3, 4, 5):
        raise NotImplementedError(f"Trying to hotswap an adapter whose weight has {old.dim()} dimensions, but only "
                                  "Conv2d and Linear are supported")
    rank_dim = 0 if old.shape[0] > new.shape[0] else 1
    if old.shape[1 - rank_dim] != new.shape[1 - rank_dim] or old.shape[2:] != new.shape[2:]:
        raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {old.shape} vs {new.shape}. Please "
                         "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                         "peft.utils.hotswap.prepare_model_for_compiled_hotswap.")
    old.data.zero_()
    _copy_rank_blocks(old.data, new, rank_dim, groups if rank_dim == 0 else 1)


def _groups(model: nn.Module, key: str) -> int:
    """The groups of the conv base under a ``lora_A`` key (its rank rows come in that many blocks), else 1."""
    parsed = parse_key(key)
    if parsed is None or parsed.container != "lora_A":
        return 1
    layer = model.get_submodule(parsed.path)
    return getattr(getattr(layer, "base_layer", None), "groups", 1)


def _set_scaling(layer: LoraLayer, adapter_name: str, scaling: float) -> None:
    current = layer.scaling[adapter_name]
    if isinstance(current, Tensor):
        current.fill_(scaling)  # the compiled graph reads this tensor: no new constant, no recompilation
    else:
        layer.scaling[adapter_name] = scaling


def _user_model(model: nn.Module) -> nn.Module:
    """The user's model, whose module paths rank_pattern / alpha_pattern name: inside a PeftModel or a LoraModel,
    else ``model`` itself (it holds the LoRA layers: inject_adapter_in_model, transformers' add_adapter). A
    transformers model's own ``base_model`` (its backbone) is not a lorakit wrapper."""
    tuner = getattr(model, "base_model", model)
    return tuner.model if isinstance(tuner, LoraModel) else model


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str,
                                    config: LoraConfig, parameter_prefix: str = "lora_") -> None:
    """Swap ``adapter_name``'s tensors for those of ``state_dict`` (keys of the PeftModel's own state dict, with the
    adapter name in them) and its scalings for ``config``'s; the model's config entry is left as it is, as in PEFT.

    Raises:
        ValueError: the adapter is merged (PEFT's sentence), or a shape that fits neither way.
        RuntimeError: keys with no tensor in the model ("unexpected keys found", PEFT's sentence); nothing changed.
    """
    model = getattr(model, "_orig_mod", model)  # a compiled wrapper shares the module and its tensors
    layers = _lora_layers(model)
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base "
                         "weights. Please unmerge the adapter first by calling `peft_model.unmerge_adapter()` (or, for "
                         "diffusers models, `diffusers_model.unfuse_lora()`); unmerging after a swap of merged weights "
                         "would otherwise corrupt them.")
    own = model.state_dict(keep_vars=True)
    unexpected = [key for key in state_dict if key not in own]
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}."
                           + " (lorakit: these keys name no tensor of the model; the new adapter targets other "
                           "layers than the loaded one, which hot-swapping cannot add.)")
    adapter_keys = [key for key in own if parameter_prefix in key and adapter_name in key.split(".")]
    with torch.no_grad():
        for key in adapter_keys:
            if key not in state_dict:  # a layer the new adapter leaves alone: ΔW = 0
                own[key].data.zero_()
        for key, value in state_dict.items():
            _copy_into(attrgetter(key)(model), value, key, _groups(model, key))
        for path, layer in named_lora_layers(_user_model(model), adapter_name):
            _set_scaling(layer, adapter_name, layer_spec(path, config).scaling)


def hotswap_adapter(model: nn.Module, model_name_or_path: str | os.PathLike[str], adapter_name: str,
                    torch_device: str | None = None, **kwargs: object) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` by those saved in ``model_name_or_path`` (a folder
    or Hub repo), keeping its name; a compiled model does not recompile (module docstring). ``kwargs``: Hub
    download keywords (``subfolder``, ``revision``, ``token``, ...).

    Raises:
        ValueError: incompatible configs (check_hotswap_configs_compatible), a merged adapter.
        RuntimeError: the new adapter targets layers the loaded one does not.
        lorakit.io.AdapterLoadError: a missing or damaged adapter folder.
    """
    folder = LoadOptions.parse("hotswap_adapter", False, None, dict(kwargs)).folder(model_name_or_path)
    config = read_config(folder)
    inner = cast("PeftModel", getattr(model, "_orig_mod", model))  # a compiled wrapper forwards to its PeftModel
    check_hotswap_configs_compatible(inner.active_peft_config, config)
    tensors = load_peft_weights(str(folder), device=torch_device)
    mapping, unknown = decode(list(tensors), layout_of(inner.base_model.model), adapter_name)
    state = {mapping[key]: value for key, value in tensors.items() if key in mapping}
    state.update({with_adapter_name(key, adapter_name): tensors[key] for key in unknown})  # reported below
    hotswap_adapter_from_state_dict(model, state, adapter_name, config)
