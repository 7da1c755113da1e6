"""LoraModel: the tuner that applies a TargetPlan to the user's model and manages its adapters.

``PeftModel.base_model`` is a LoraModel and ``LoraModel.model`` is the user's model, mutated in place:
each targeted module is swapped for a ``LoraLayer`` holding it as ``base_layer``, each modules_to_save
module for a ``ModulesToSaveWrapper``. That nesting is what makes state-dict keys read
``base_model.model.<path>.lora_A.<adapter>.weight`` exactly as in PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapter_rules import adapters_to_merge, check_not_merged, check_one_saved_copy
from .apply import apply
from . import combine
from .config import LoraConfig
from .errors import explain, warn
from .merge_check import checked_merge
from .layer import LoraLayer, named_lora_layers
from .plan import AdapterModule, Plan, check_adapter_name, plan_adapter
from .quant import dequantize_model, merge_reporting_rounding
from .replication import replicated
from .saved_modules import ModulesToSaveWrapper
from .trainable_tokens import TrainableTokensWrapper
from .variants import model_method

__all__ = ["LoraModel", "check_adapter_name", "planned"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector for the block (restored after, as it was).

    Injection creates thousands of long-lived objects (modules, their dicts, parameters); each batch of
    them triggers a collection, and the full ones walk every object of the process (torch, transformers,
    the model): most of ``get_peft_model``'s time on a large model. Nothing collectable is made here.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def planned(model: nn.Module, config: LoraConfig, adapter_name: str, existing: dict[str, LoraConfig] | None = None,
            **options: Any) -> Iterator[Plan]:
    """``plan_adapter`` for the block, after ``layer_replication``'s copies (which the plan targets) are made;
    an error inside the block puts the original layer stack back. The garbage collector waits meanwhile."""
    with gc_paused(), replicated(model, config.layer_replication):
        yield plan_adapter(model, config, adapter_name, existing, **options)


def _plain(module: AdapterModule) -> nn.Module:
    """The module an adapter wrapper stands in for: a LoraLayer's base_layer, a wrapper's original_module."""
    return module.base_layer if isinstance(module, LoraLayer) else module.original_module


class LoraModel(nn.Module):
    """The LoRA tuner (PEFT's ``LoraModel``): ``self.model`` is the user's model with adapters injected.

    Raises:
        ValueError: from ``inject_adapter`` (see ``resolve_targets``) or for an invalid adapter name.
    """

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig | dict[str, LoraConfig], adapter_name: str = "default",
                 *, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                 plan: Plan | None = None) -> None:
        """``plan``: inject this plan of ``plan_adapter`` (made by the caller, e.g. checked against a file)."""
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # target_parameters, "<module path>.<parameter name>"
        self.active_adapter: str | list[str] = adapter_name
        self.autocast_adapter_dtype = autocast_adapter_dtype
        config = config[adapter_name] if isinstance(config, dict) else config
        if plan is None:
            with planned(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage) as plan:
                injected = self.apply_plan(plan)
        else:
            injected = self.apply_plan(plan)
        # PEFT freezes inference adapters; no walk: the injected modules are every adapter module there is
        self.set_adapter(adapter_name, inference_mode=config.inference_mode, _modules=injected)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the tuner lacks are the user's model's (``peft_model.base_model.config``), as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        method = model_method(name)  # a variant's model-level method (KaSA's _get_kasa_loss, ...)
        if method is not None:
            return functools.partial(method, self)
        return getattr(super().__getattr__("model"), name)

    # ---- injection: plan.py, then apply.py ----------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: LoraConfig, *, autocast_adapter_dtype: bool | None = None,
                       low_cpu_mem_usage: bool = False) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` targets, frozen; ``set_adapter`` activates.

        ``autocast_adapter_dtype`` (default: the tuner's): float32 factors over a half-precision base, else the
        base's dtype. ``low_cpu_mem_usage``: plain-init factors are created on the meta device, uninitialised,
        to be filled by a load (``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``), as PEFT does;
        variants and data-driven inits need real tensors and are built as without the flag.

        Raises:
            ValueError: a name already in use, a second adapter with ``bias != "none"`` (PEFT's rule: the
                biases are the base model's, one adapter at most may train them), or a targeting error.
        """
        with planned(self.model, config, adapter_name, self.peft_config, tuner_name=type(self).__name__,
                     low_cpu_mem_usage=low_cpu_mem_usage) as plan:
            self.apply_plan(plan, autocast_adapter_dtype)

    def apply_plan(self, plan: Plan, autocast_adapter_dtype: bool | None = None) -> list[AdapterModule]:
        """Apply ``plan`` (apply.py: all of it or, on an error, nothing) and record its adapter; returns the
        adapter modules it made or extended."""
        autocast = self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
        injected = apply(self.model, plan, self.active_adapters, autocast)
        self.peft_config[plan.adapter_name] = plan.recorded
        self.targeted_module_names.extend(p for p in plan.targets.layers if p not in self.targeted_module_names)
        self.targeted_parameter_names.extend(t.full_name for t in plan.targets.parameters
                                             if t.full_name not in self.targeted_parameter_names)
        return injected

    # ---- adapters ----------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[LoraLayer]:
        return (m for m in self.model.modules() if isinstance(m, LoraLayer))

    def _adapter_modules(self) -> Iterator[AdapterModule]:
        return (m for m in self.model.modules() if isinstance(m, AdapterModule))

    def _token_wrappers(self) -> list[TrainableTokensWrapper]:
        return [m for m in self.model.modules() if isinstance(m, TrainableTokensWrapper)]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False,
                    _modules: list[AdapterModule] | None = None) -> None:
        """Activate one adapter or several (their outputs add) and make them trainable, as PEFT does, whatever
        their configs' ``inference_mode`` (``inference_mode=True``: they stay frozen).

        A merged layer is unmerged first, with PEFT's warning, so W never holds an adapter that is not active.
        """
        names = self._known(adapter_name)
        check_one_saved_copy(self.model, names)
        trainable = not inference_mode
        for module in self._adapter_modules() if _modules is None else _modules:
            merged = getattr(module, "merged_adapters", None)  # (a modules_to_save copy is never merged)
            if merged and not isinstance(module, ModulesToSaveWrapper):  # W holds the old adapter: unmerge first
                warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                module.unmerge()
            module.set_adapter(names, trainable=trainable)
        self._set_bias_trainable(names, trainable)
        self.active_adapter = adapter_name

    def _known(self, adapter_names: str | list[str]) -> list[str]:
        """``adapter_names`` as a list.

        Raises:
            ValueError: a name that is not an adapter of this model.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(explain(f"unknown adapter(s) {unknown}", got=unknown,
                                     expected=f"one of {list(self.peft_config)}"))
        return names

    def _inference_only(self, names: list[str]) -> bool:
        """True when any of ``names`` was created for inference (a load without ``is_trainable``)."""
        return any(self.peft_config[name].inference_mode for name in names)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch ``requires_grad`` of the named adapters' tensors (factors, DoRA m, modules_to_save copies).

        Raises:
            ValueError: an unknown adapter name.
        """
        names = self._known(adapter_names)
        for module in self._adapter_modules():
            for name in names:
                params = (module.trainable_parameters(name) if isinstance(module, LoraLayer) else
                          module.adapter_parameters(name) if isinstance(module, TrainableTokensWrapper) else
                          module.modules_to_save[name].parameters() if name in module.modules_to_save else ())
                for param in params:
                    param.requires_grad_(requires_grad)

    def adopt_config(self, adapter_name: str, config: LoraConfig) -> None:
        """Hold the caller's ``config`` object for ``adapter_name`` (PEFT keeps the object it was given), updated
        in place with what injection recorded (resolved targets, modules_to_save, fan_in_fan_out)."""
        recorded = self.peft_config[adapter_name]
        for field in dataclasses.fields(recorded):
            value = getattr(recorded, field.name)
            if getattr(config, field.name) != value:
                setattr(config, field.name, value)
        self.peft_config[adapter_name] = config

    def _set_bias_trainable(self, names: list[str], trainable: bool) -> None:
        """bias="all": every bias trains; "lora_only": the biases of adapted layers train."""
        biases = {self.peft_config[name].bias for name in names}
        if "all" in biases:
            for param_name, param in self.model.named_parameters():
                if "bias" in param_name:
                    param.requires_grad_(trainable)
        elif "lora_only" in biases:
            for layer in self.lora_layers():
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(trainable)

    def drop_removed_targets(self) -> None:
        """Keep in ``targeted_module_names`` only the paths that still hold a LoRA layer (after a delete, or EVA's
        rank-0 removals)."""
        alive = {path for path, _ in named_lora_layers(self.model)}
        self.targeted_module_names = [p for p in self.targeted_module_names if p in alive]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere; layers left without adapters go back to their base module.

        Deleting the last adapter leaves ``peft_config`` empty and no adapter active (as PEFT): the model runs
        as the base model until ``add_adapter`` / ``load_adapter`` and ``set_adapter``.

        Raises:
            ValueError: an unknown name, or an adapter merged into the base weights (nothing changes then).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist: "
                             + explain("unknown adapter", got=adapter_name, expected=f"one of {list(self.peft_config)}"))
        check_not_merged(self.lora_layers(), adapter_name)
        # innermost first: a layer nested in another's base (MultiheadAttention's out_proj) goes back to its base
        # while its owner's path still leads to it
        for path, module in reversed(list(self.model.named_modules())):
            if isinstance(module, AdapterModule):
                module.delete_adapter(adapter_name)
                if not (module.r if isinstance(module, LoraLayer) else module._adapters):  # its last adapter went
                    self.model.set_submodule(path, _plain(module))
        del self.peft_config[adapter_name]
        self.drop_removed_targets()
        if not self.peft_config:
            self.active_adapter = []
            return
        remaining = [n for n in self.active_adapters if n != adapter_name] or [next(iter(self.peft_config))]
        if remaining != self.active_adapters:  # an inactive adapter went: the active ones (merged too) stay as they are
            self.set_adapter(remaining[0] if len(remaining) == 1 else remaining,
                             inference_mode=self._inference_only(remaining))

    @contextlib.contextmanager
    def routed(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, row i of the batch uses adapter ``adapter_names[i]`` ("__base__": none).

        Raises:
            ValueError: unknown names, a model in training mode, or merged adapters.
        """
        unknown = sorted({n for n in adapter_names if n not in self.peft_config and n != "__base__"})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. "
                             + explain("adapter_names has unknown adapter(s)",
                                       expected=f"names among {list(self.peft_config)} or '__base__'"))
        if self.model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode. Mixed-adapter batches "
                             "are for inference only; call model.eval() first")
        if any(layer.merged for layer in self.lora_layers()):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(row)
        routes = (len(adapter_names), [(name, torch.tensor(r)) for name, r in rows.items()])
        modules = list(self._adapter_modules())
        for module in modules:
            module._routes = routes
        try:
            yield
        finally:
            for module in modules:
                module._routes = None

    def enable_adapter_layers(self) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone (merged adapters are unmerged at the next forward).

        Biases trained by an adapter (``bias != "none"``) are the base model's own and stay changed: the warning
        says so, in PEFT's words.
        """
        for name in self.active_adapters:
            bias = self.peft_config[name].bias if name in self.peft_config else "none"
            if bias != "none":
                warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                     "same output as the base model would without adaption. (Adapter "
                     f"{name!r} trained the base model's biases in place; disabling the LoRA layers keeps them.)")
        for module in self._adapter_modules():
            module.enable_adapters(False)

    def adapter_layers_disabled(self) -> bool | None:
        """True when every adapter layer is disabled, False when every one is enabled, None for a mix."""
        states = {module.disable_adapters for module in self._adapter_modules()}
        return None if len(states) > 1 else states.pop() if states else False

    # ---- merge -------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the (active) adapters into the base weights: W ← W + s·ΔW."""
        layers = list(self.lora_layers())
        active = list(dict.fromkeys(name for layer in layers for name in layer.active_adapters))  # each layer's own
        names = adapters_to_merge(layers, adapter_names, active)
        if not names:
            return

        chosen = names if adapter_names is not None else None  # None: each layer merges its own active adapters

        def merge() -> None:
            # trainable tokens first (E <- E', trainable_tokens.py): a LoRA layer around a tied head's wrapper then
            # reads and writes the wrapper's real weight, not the computed E'
            for wrapper in self._token_wrappers():
                wrapper.merge(safe_merge=safe_merge, adapter_names=chosen)
            for layer in self.lora_layers():
                layer.merge(safe_merge=safe_merge, adapter_names=chosen)

        merge_reporting_rounding(self.lora_layers(), merge)  # a quantized base is requantized: say how much

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers():
            layer.unmerge()
        for wrapper in self._token_wrappers():
            wrapper.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None,
                progressbar: bool = False) -> nn.Module:
        modules = list(reversed(list(self.model.named_modules())))  # innermost first, as delete_adapter
        if progressbar:  # PEFT's tqdm bar over the model's modules
            try:
                from tqdm import tqdm
            except ImportError:
                raise ImportError("progressbar=True needs tqdm: pip install tqdm") from None
            modules = tqdm(modules, desc="Unloading " + ("and merging " if merge else "") + "model")
        for path, module in modules:
            if isinstance(module, ModulesToSaveWrapper):
                self.model.set_submodule(path, module.active_module)
            elif isinstance(module, (LoraLayer, TrainableTokensWrapper)):
                if merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                else:
                    module.unmerge()
                self.model.set_submodule(path, _plain(module))
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, dequantize: bool = False,
                         check: bool = False, probe: object = None) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model (no LoRA layers left).

        Quantized bases are dequantized, merged in float32 and requantized (with a warning giving the rounding);
        ``dequantize=True`` instead turns every quantized layer into a float32 nn.Linear first (quant.py).
        ``progressbar=True`` shows a tqdm bar over the model's modules, as PEFT does. ``check=True`` measures max |merged - unmerged| on ``probe`` (default: the model's ``dummy_inputs``),
        records it as ``model.lorakit_merge_check`` and warns above the dtype's precision (merge_check.py).
        """
        if dequantize:
            dequantize_model(self.model)

        def unload() -> nn.Module:
            return merge_reporting_rounding(list(self.lora_layers()), lambda: self._unload(
                merge=True, safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar))

        return checked_merge(self.model, unload, probe) if check else unload()

    def unload(self) -> nn.Module:
        """Return the plain base model with the adapters removed, unmerged."""
        return self._unload(merge=False)

    # ---- combining adapters --------------------------------------------------------------------------------
    add_weighted_adapter = combine.add_weighted_adapter  # PEFT's method: combine.py with this tuner
