"""``trainable_token_indices``: train only chosen rows of an embedding matrix (e.g. new special tokens).

For token indices I = (i_1 .. i_k) of an embedding E (vocab, dim) the adapter holds D (k, dim), initialised to
E[I], and the layer runs with

    E'[j] = D[m]   if j = i_m,        E'[j] = E[j]   otherwise,

so only D trains and an untouched adapter gives the base output. D holds the rows themselves, not a difference:
a row set by a resized, re-initialised vocabulary stays well defined. Merging writes E ← E' (the replaced rows
kept in ``trainable_tokens_original``, non-persistent, for unmerge). An output head tied to E (lm_head with
``tie_word_embeddings``) gets a second layer that shares D, the originals and I with the embedding's
(``tied_adapter``), and computes logits = x E'ᵀ (+ bias).

Names follow PEFT 0.21.2 (state-dict keys and the attributes code written for PEFT reads):
``<path>.token_adapter.base_layer``, ``<path>.token_adapter.trainable_tokens_delta.<adapter>``; the tied layer's
tensors are the embedding's and are not written to adapter files.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import explain, warn
from .layer import Routes, run_routed
from .variants import BufferDict


class TrainableTokensLayer(nn.Module):
    """E' = E with rows I replaced by D (see the module docstring); ``base_layer`` is the Embedding or tied head."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, tied_adapter: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        # a list keeps the tied layer out of named_modules() (its tensors are saved once, under the embedding)
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = BufferDict(persistent=False)
            self.token_indices: dict[str, list[int]] = {}
        else:  # the very same containers: one D for both sides of the tie
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        weight = cast(Tensor, base_layer.weight)  # (vocab, dim) for an Embedding and for a Linear head alike
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) \
            if isinstance(base_layer, nn.Embedding) else (weight.shape[1], weight.shape[0])

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        return self._tied_adapter[0] if self._tied_adapter else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def _weight(self) -> Tensor:
        """E, the base layer's (vocab, dim) weight."""
        return cast(Tensor, self.base_layer.weight)

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Add D for ``adapter_name``: E[I] (``init_weights``) or a standard normal draw; a tied layer adds nothing.

        Raises:
            IndexError: an index outside the vocabulary (PEFT's torch error says "out of bounds").
            ValueError: an index given twice (which of two rows D would write is undefined).
        """
        if self.tied_adapter is not None:
            return
        weight = self._weight
        bad = [i for i in token_indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise IndexError(explain(f"trainable_token_indices {bad} are out of bounds of the vocabulary", got=bad,
                                     expected=f"indices in [0, {weight.shape[0]})",
                                     fix="resize the token embeddings first (model.resize_token_embeddings)"))
        twice = sorted({i for i in token_indices if token_indices.count(i) > 1})
        if twice:
            raise ValueError(explain(f"trainable_token_indices lists {twice} more than once", got=list(token_indices),
                                     expected="distinct token ids", fix="drop the repeated ids"))
        originals = weight.detach()[torch.tensor(token_indices, dtype=torch.long, device=weight.device)].clone()
        values = originals.clone() if init_weights else torch.randn_like(originals)
        self.token_indices[adapter_name] = list(token_indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=False)
        self.trainable_tokens_original[adapter_name] = originals

    def _index(self, adapter_name: str, device: torch.device) -> Tensor:
        return torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=device)

    def check_overlap(self, adapter_names: list[str]) -> None:
        """Refuse adapters (merged ones first) that replace a common row.

        Raises:
            ValueError: PEFT's "Token indices of adapter ... are already defined" error.
        """
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported. (Two adapters that replace the "
                    "same rows of the embedding cannot both apply: activate or merge one of them, or give them "
                    "disjoint indices.)")
            seen |= rows

    def get_merged_weights(self, adapter_names: list[str]) -> Tensor:
        """E' for ``adapter_names`` (a new tensor, differentiable in each D; E itself when there are none)."""
        W = self._weight
        for name in adapter_names:
            W = W.index_copy(0, self._index(name, W.device), self.trainable_tokens_delta[name].to(W.dtype))
        return W

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    def forward_adapters(self, x: Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        disabled = self._disable_adapters or not adapter_names
        if disabled and self.merged:
            self.unmerge()
        if disabled or self.merged:  # E as it is: the base layer alone (merged rows are in E already)
            return cast(Tensor, self.base_layer(x, *args, **kwargs))
        self.check_overlap(adapter_names)
        W = self.get_merged_weights(adapter_names)  # (vocab, dim)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, W, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) multiply in their forward
            return out if scale is None else out * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
        return F.linear(x, W, getattr(base, "bias", None))  # the tied head: (..., dim) -> (..., vocab)

    # ---- adapters ----------------------------------------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = [name for name in names if name in self.trainable_tokens_delta]
        if self.tied_adapter is None:
            for name, delta in self.trainable_tokens_delta.items():
                delta.requires_grad_(trainable and name in self._active_adapter)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if self.tied_adapter is None:
            for container in (self.trainable_tokens_delta, self.trainable_tokens_original):
                if adapter_name in container:
                    del container[adapter_name]
            self.token_indices.pop(adapter_name, None)
        self._active_adapter = [name for name in self._active_adapter if name != adapter_name]

    # ---- merge -------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """E ← E' for ``adapter_names`` (default: the active ones) not merged yet.

        Raises:
            ValueError: overlapping rows, or (``safe_merge``) a non-finite result, before E changes.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [name for name in names if name not in self.merged_adapters and name in self.token_indices]
        if not names:
            return
        self.check_overlap(names)
        merged = self.get_merged_weights(names).detach()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        with torch.no_grad():
            self._weight.copy_(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """E[I] ← the originals, last merged first."""
        if not self.merged:
            warn("Already unmerged. Nothing to do.")
            return
        weight = self._weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.index_copy_(0, self._index(name, weight.device),
                                   self.trainable_tokens_original[name].to(weight.dtype))


class TrainableTokensWrapper(nn.Module):
    """The module put where the embedding (or its tied head) was: ``token_adapter`` holds the real work."""

    adapter_layer_names = ("token_adapter.trainable_tokens_delta",)
    other_param_names = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: TrainableTokensLayer | None = None, init_weights: bool = True) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_adapter)
        self._adapters: set[str] = set()
        self._routes: Routes | None = None  # mixed batch, set by the tuner
        self.update(adapter_name, token_indices, init_weights)  # inactive and frozen until set_adapter

    def update(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        if adapter_name not in self._adapters:
            self.token_adapter.update_layer(adapter_name, token_indices, init_weights)
            self._adapters.add(adapter_name)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> Tensor:
        """E' of the active adapters (E when disabled): what the model reads as this layer's weight."""
        layer = self.token_adapter
        if layer.disable_adapters or layer.merged:
            return layer._weight
        return layer.get_merged_weights(layer.active_adapters)

    @property
    def in_features(self) -> int:
        """The wrapped layer's (what a LoRA layer around a tied head's wrapper reads to size its factors)."""
        return int(self.token_adapter.in_features)

    @property
    def out_features(self) -> int:
        return int(self.token_adapter.out_features)

    @property
    def disable_adapters(self) -> bool:
        return self.token_adapter.disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return self.token_adapter.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self.token_adapter.active_adapter

    @property
    def merged_adapters(self) -> list[str]:
        return self.token_adapter.merged_adapters

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._routes is None:
            return cast(Tensor, self.token_adapter(x, *args, **kwargs))
        out = run_routed(self._routes, x, lambda name, rows: self.token_adapter.forward_adapters(
            rows, [name] if name in self._adapters else [], *args, **kwargs))  # "__base__" or none here: E
        assert out is not None  # routes cover the batch (LoraModel.routed)
        return out

    def check_set_adapter(self, adapter_names: list[str]) -> None:
        """Refuse activating two adapters that each train rows here (the model-level rule, as PEFT's).

        Raises:
            ValueError: PEFT's "Only one adapter can be set at a time for TrainableTokensWrapper" error.
        """
        owners = [name for name in adapter_names if name in self._adapters]
        if len(owners) > 1:
            raise ValueError(f"Only one adapter can be set at a time for {self!r}, got {len(owners)}: adapters "
                             f"{owners} each train rows of this embedding (trainable_token_indices); activate one of "
                             "them, or merge one into the weights first")

    def set_adapter(self, adapter_names: str | list[str], *, trainable: bool = True) -> None:
        self.token_adapter.set_adapter(adapter_names, trainable=trainable)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """D of ``adapter_name`` when this wrapper trains rows for it (a tied head returns the embedding's D)."""
        deltas = self.token_adapter.trainable_tokens_delta
        return [deltas[adapter_name]] if adapter_name in deltas else []

    def enable_adapters(self, enabled: bool) -> None:
        self.token_adapter.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_adapter.delete_adapter(adapter_name)
        self._adapters.discard(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self.token_adapter.merged:
            self.token_adapter.unmerge()
