"""``modules_to_save``: modules trained in full next to the adapters, and saved with them.

The wrapper keeps the frozen ``original_module`` and one trainable copy per adapter in
``modules_to_save[adapter_name]`` (PEFT's names, so state-dict keys match). The forward pass uses the
active adapter's copy, or the original when adapters are disabled or the active adapter has no copy.
"""

from __future__ import annotations

import copy
from typing import cast

from torch import Tensor, nn

from .layer import Routes, run_routed


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` (frozen) + ``modules_to_save[name]`` (a trainable deep copy per adapter)."""

    adapter_layer_names = ("modules_to_save",)  # PEFT's name of the per-adapter container
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self._routes: Routes | None = None  # mixed batch, set by the tuner
        self.update(adapter_name)  # inactive and frozen until the tuner's set_adapter

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str], *, trainable: bool = True) -> None:
        """Route forward through the active adapter's copy (adapters without one here are ignored); it trains.

        Raises:
            ValueError: two of ``adapter_names`` have a copy here (copies replace the module, they cannot add up).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [name for name in names if name in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self!r}, got {len(names)}: adapters "
                             f"{names} each have their own full copy of this module (modules_to_save), and copies "
                             "replace the module instead of adding up; activate one of them, or give them different "
                             "modules_to_save")
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in names)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [name for name in self._active_adapter if name != adapter_name]

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    @property
    def _adapters(self) -> set[str]:
        """The adapters with a copy here (PEFT's AuxiliaryTrainingWrapper attribute, read by code written for PEFT)."""
        return set(self.modules_to_save)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters that have a copy here (at most one)."""
        active = self._active_adapter  # a str too when code written for PEFT sets PEFT's private attribute
        return [active] if isinstance(active, str) else list(active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, else the original."""
        if not self._disable_adapters:
            for name in self._active_adapter:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    @property
    def weight(self) -> Tensor:
        return cast(Tensor, self.active_module.weight)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.active_module, "bias", None)

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> object:
        if self._routes is None:
            return self.active_module(x, *args, **kwargs)
        return run_routed(self._routes, x, lambda name, rows: self._copy(name)(rows, *args, **kwargs))

    def _copy(self, adapter_name: str) -> nn.Module:
        """The module a routed sub-batch of ``adapter_name`` runs through: its copy, else ("__base__") the original."""
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.original_module
