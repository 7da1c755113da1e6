"""The PEFT adapter format as an explicit codec: model state-dict keys <-> adapter file keys.

In memory an adapter tensor carries its adapter's name; on disk it does not (PEFT 0.21.2):

    base_model.model.<P>.lora_A.<name>.weight            <->  base_model.model.<P>.lora_A.weight
    base_model.model.<P>.lora_B.<name>.{weight,bias}     <->  base_model.model.<P>.lora_B.{weight,bias}
    base_model.model.<P>.lora_embedding_{A,B}.<name>     <->  base_model.model.<P>.lora_embedding_{A,B}
    base_model.model.<P>.lora_magnitude_vector.<name>.weight <-> base_model.model.<P>.lora_magnitude_vector
    base_model.model.<P>.<variant's>.<name>[.<rest>]     <->  base_model.model.<P>.<variant's>[.<rest>]
                                                               (Variant.containers: lora_velora_embed, lora_diag)
    base_model.model.<W>.modules_to_save.<name>.<rest>   <->  base_model.model.<W>.<rest>
    base_model.model.<T>.token_adapter.trainable_tokens_delta.<name>
                                                         <->  base_model.model.<T>.token_adapter.trainable_tokens_delta

where <P> is a LoRA layer's path, <W> a modules_to_save wrapper's path and <T> a trainable-tokens wrapper's (a
head tied to the input embedding shares its tensor, written once, under the embedding). Base tensors saved by the bias
rules (bias="all": every key containing "bias"; "lora_only": ``<P>.base_layer.bias``) and by
``save_embedding_layers`` keep their key, minus any ``.<name>`` segment, as PEFT writes them.

Both directions work on a ``Layout``: the paths of the LoRA layers and wrappers and the shape of every
state-dict key. A layout can describe a model as it is, or as it will be once an adapter is injected
(``planned_layout``), which is how a load is validated before the model is touched.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .kinds import Kind, kind_for
from .layer import LayerSpec, LoraLayer
from .saved_modules import ModulesToSaveWrapper
from .kinds_param import plan_parameter_keys
from .targeting import TargetPlan
from .token_plan import DELTA, TokenTarget, planned_token_shapes
from .trainable_tokens import TrainableTokensWrapper
from .variants import resolve_variant, variant_containers

PREFIX = "base_model.model."
FACTOR_CONTAINERS = ("lora_A", "lora_B")  # modules: the key goes on with .weight / .bias
# bare Parameters: model key <container>.<name>, file key <container>
PARAMETER_CONTAINERS = ("lora_embedding_A", "lora_embedding_B")
MAGNITUDE = "lora_magnitude_vector"  # a module holding .weight, written without ".weight"
ADAPTER_CONTAINERS = FACTOR_CONTAINERS + PARAMETER_CONTAINERS + (MAGNITUDE,)
WRAPPER_PARTS = ("original_module", "modules_to_save")


def _containers() -> tuple[str, ...]:
    """Every per-adapter container of a LoRA layer, the registered variants' (Variant.containers) included."""
    return ADAPTER_CONTAINERS + variant_containers()


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT saves these base weights when targeted


# ---- one key, parsed without a model -------------------------------------------------------------------------
# A file key's (container, tail) -> its role: A holds the rank in dim 0, B in dim 1; "bias" is lora_B's bias.
FILE_ROLES = {("lora_A", "weight"): "A", ("lora_embedding_A", ""): "A", ("lora_B", "weight"): "B",
              ("lora_embedding_B", ""): "B", ("lora_B", "bias"): "bias", (MAGNITUDE, ""): "magnitude"}


@dataclass(frozen=True)
class AdapterKey:
    """A LoRA tensor's key split at its per-adapter container: ``<path>.<container>[.<rest>]``.

    A file key's rest is its tail (``()``, ``("weight",)``, ``("bias",)``); a model key's starts with the
    adapter name (``("default", "weight")``). ``path`` keeps whatever prefix the key had.
    """

    path: str
    container: str
    rest: tuple[str, ...]

    @property
    def role(self) -> str | None:
        """"A", "B", "bias" or "magnitude" when this is a file key PEFT writes for a factor, else None."""
        return FILE_ROLES.get((self.container, ".".join(self.rest)))


def parse_key(key: str) -> AdapterKey | None:
    """``key`` split at its first per-adapter container (``lora_A``, ``lora_embedding_B``, a variant's ...), or
    None for a key that holds no LoRA tensor (a base weight, a modules_to_save copy)."""
    parts, containers = key.split("."), _containers()
    for i, part in enumerate(parts):
        if i and part in containers:
            return AdapterKey(".".join(parts[:i]), part, tuple(parts[i + 1:]))
    return None


def with_adapter_name(key: str, adapter_name: str) -> str:
    """A file key as PEFT reads it into a model: ``adapter_name`` after its first ``lora_*`` segment (PEFT's
    ``parameter_prefix`` rule, which also names keys of containers lorakit does not know)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return ".".join([*parts[:i + 1], adapter_name, *parts[i + 1:]])
    return key


Shapes = dict[str, tuple[int, ...]]  # state-dict key -> tensor shape


@dataclass(frozen=True)
class Layout:
    """What the codec needs to know of a model: structure paths and every state-dict key's shape."""

    lora_paths: frozenset[str]
    saved_paths: frozenset[str]
    shapes: Shapes
    token_paths: frozenset[str] = frozenset()  # trainable-tokens wrappers holding their own D
    tied_token_paths: frozenset[str] = frozenset()  # ... and those sharing the input embedding's


def layout_of(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> Layout:
    """The layout of the user's model as it is now (keys carry the ``base_model.model.`` prefix).

    ``state``: the model's ``state_dict(keep_vars=True)`` when the caller already has it (one walk, not two).
    """
    lora: set[str] = set()
    saved: set[str] = set()
    tokens: set[str] = set()
    tied: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            lora.add(path)
        elif isinstance(module, ModulesToSaveWrapper):
            saved.add(path)
        elif isinstance(module, TrainableTokensWrapper):
            (tokens if module.token_adapter.tied_adapter is None else tied).add(path)
    state = model.state_dict(keep_vars=True) if state is None else state
    shapes = {PREFIX + k: tuple(v.shape) for k, v in state.items()}
    return Layout(frozenset(lora), frozenset(saved), shapes, frozenset(tokens), frozenset(tied))


def planned_layout(model: nn.Module, plan: TargetPlan, adapter_name: str,
                   tokens: dict[str, TokenTarget] | None = None) -> Layout:
    """The layout ``model`` will have once ``plan`` (and the trainable-tokens plan ``tokens``, token_plan.py) is
    injected as ``adapter_name`` (nothing is changed)."""
    now = layout_of(model)
    shapes = dict(now.shapes)
    lora_paths = set(now.lora_paths)
    for path, spec in plan.layers.items():
        _plan_layer(shapes, lora_paths, path, model.get_submodule(path), plan.kinds[path], spec, adapter_name)
    plan_parameter_keys(model, list(plan.parameters), adapter_name, PREFIX, shapes, lora_paths)
    for path in plan.modules_to_save:
        if path not in now.saved_paths:
            _move_under(shapes, PREFIX + path, "original_module")
        original = f"{PREFIX}{path}.original_module."
        for key in [k for k in shapes if k.startswith(original)]:
            shapes[f"{PREFIX}{path}.modules_to_save.{adapter_name}.{key[len(original):]}"] = shapes[key]
    tokens = tokens or {}
    planned_token_shapes(model, shapes, tokens, adapter_name, PREFIX)
    return Layout(frozenset(lora_paths), now.saved_paths | set(plan.modules_to_save), shapes,
                  now.token_paths | {p for p, t in tokens.items() if t.tied_to is None},
                  now.tied_token_paths | {p for p, t in tokens.items() if t.tied_to is not None})


def _plan_layer(shapes: Shapes, lora_paths: set[str], path: str, module: nn.Module, kind: Kind, spec: LayerSpec,
                adapter_name: str) -> None:
    """Add to ``shapes`` the keys of ``module`` at ``path`` once it is a LoraLayer holding ``adapter_name``,
    and those of its companions (``Kind.companions``), nested at ``<path>.base_layer.<attribute>``."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if not isinstance(module, LoraLayer):
        _move_under(shapes, PREFIX + path, "base_layer")
    lora_paths.add(path)
    with torch.device("meta"):
        A, B = kind.make_factors(base, spec.r, spec.lora_bias)
    containers = PARAMETER_CONTAINERS if kind.embedding else FACTOR_CONTAINERS
    for container, factor in zip(containers, (A, B), strict=True):
        stem = f"{PREFIX}{path}.{container}.{adapter_name}"
        if isinstance(factor, nn.Parameter):
            shapes[stem] = tuple(factor.shape)
        else:
            shapes.update({f"{stem}.{k}": tuple(v.shape) for k, v in factor.state_dict().items()})
    variant = resolve_variant(spec, kind, base)
    if variant is not None:  # DoRA's lora_magnitude_vector, BD-LoRA's compact factor: <container>.<name>.weight
        for container, shape in variant.shapes(kind, base).items():
            if isinstance(shape, dict):  # {rest: shape}: <container>.<name>.<rest>, or <container>.<name> for ""
                for rest, sub in shape.items():
                    shapes[f"{PREFIX}{path}.{container}.{adapter_name}{'.' + rest if rest else ''}"] = sub
            else:  # a module's weight: <container>.<name>.weight
                shapes[f"{PREFIX}{path}.{container}.{adapter_name}.weight"] = shape
    for attribute, child in (kind.companions(base) if kind.companions is not None else {}).items():
        child_kind = child.kind if isinstance(child, LoraLayer) else kind_for(child, attribute)
        _plan_layer(shapes, lora_paths, f"{path}.base_layer.{attribute}", child, child_kind, spec, adapter_name)


def _move_under(shapes: Shapes, stem: str, child: str) -> None:
    for key in [k for k in shapes if k.startswith(stem + ".")]:
        shapes[f"{stem}.{child}.{key[len(stem) + 1:]}"] = shapes.pop(key)


# ---- classifying a model key ----------------------------------------------------------------------------------
def _split_at(key: str, paths: frozenset[str], containers: tuple[str, ...], rest_needed: bool
              ) -> tuple[str, str, str, str] | None:
    """(path, container, adapter, rest) at the first ``<path>.<container>.<adapter>[.<rest>]`` in ``key`` whose
    path is one of ``paths``: a LoRA tensor (``lora_paths``, a LoRA container), or a modules_to_save copy
    (``saved_paths``, "modules_to_save", ``rest_needed``: a copy's key goes on past the adapter name); else None."""
    parts = key[len(PREFIX):].split(".")
    for i, part in enumerate(parts):
        if part in containers and ".".join(parts[:i]) in paths and i + (2 if rest_needed else 1) < len(parts):
            return ".".join(parts[:i]), part, parts[i + 1], ".".join(parts[i + 2:])
    return None


def _token_part(key: str, layout: Layout) -> tuple[str, str] | None:
    """(wrapper path, adapter) when ``key`` is a trainable-tokens D (own or tied), else None."""
    stem, _, name = key.rpartition(".")
    path = stem[len(PREFIX):].removesuffix("." + DELTA)
    if stem.endswith("." + DELTA) and path in layout.token_paths | layout.tied_token_paths:
        return path, name
    return None


def _strip(key: str, adapter_name: str) -> str:
    """Drop the adapter-name segment that follows "modules_to_save" (PEFT's bias="all" keys keep the rest)."""
    parts = key.split(".")
    keep = [p for i, p in enumerate(parts) if not (p == adapter_name and i and parts[i - 1] == "modules_to_save")]
    return ".".join(keep)


# ---- encode: model keys -> file keys -----------------------------------------------------------------------
def encode(layout: Layout, adapter_name: str, bias: str, embedding_paths: Sequence[str] = ()) -> dict[str, str]:
    """{model key: file key} of everything PEFT writes for ``adapter_name``."""
    mapping: dict[str, str] = {}
    containers = _containers()
    for key in layout.shapes:
        tokens = _token_part(key, layout)
        if tokens is not None:  # a tied head's D is the embedding's: written once, under the embedding
            if tokens[1] == adapter_name and tokens[0] in layout.token_paths:
                mapping[key] = f"{PREFIX}{tokens[0]}.{DELTA}"
            continue
        adapter = _split_at(key, layout.lora_paths, containers, rest_needed=False)
        saved = _split_at(key, layout.saved_paths, ("modules_to_save",), rest_needed=True) if adapter is None else None
        if adapter is not None:
            path, container, name, rest = adapter
            if name == adapter_name:
                tail = "" if container in PARAMETER_CONTAINERS or container == MAGNITUDE or not rest else "." + rest
                mapping[key] = f"{PREFIX}{path}.{container}{tail}"
        elif saved is not None and saved[2] == adapter_name:
            mapping[key] = f"{PREFIX}{saved[0]}.{saved[3]}"
        elif bias == "all" and "bias" in key and (saved is None or saved[2] == adapter_name):
            mapping[key] = _strip(key, adapter_name)
    if bias == "lora_only":
        for path in layout.lora_paths:
            key = f"{PREFIX}{path}.base_layer.bias"
            if key in layout.shapes:
                mapping[key] = key
    for path in embedding_paths:
        stem = f"{PREFIX}{path}.base_layer." if path in layout.lora_paths else f"{PREFIX}{path}."
        for key in layout.shapes:
            if key.startswith(stem) and not any(part in key[len(stem):].split(".") for part in containers):
                tokens = _token_part(key, layout)
                if tokens is None:
                    mapping[key] = key
                elif tokens[0] in layout.tied_token_paths and tokens[1] == adapter_name:
                    mapping[key] = f"{PREFIX}{tokens[0]}.{DELTA}"  # PEFT writes the tied head's D here too
    return mapping


def embedding_paths(model: nn.Module, target_modules: Collection[str] | str | None,
                    save_embedding_layers: bool | str) -> list[str]:
    """Paths of the embedding layers whose base weights PEFT saves (``save_embedding_layers``).

    "auto" means True when ``target_modules`` names ``embed_tokens`` or ``lm_head``; then only the LoRA-wrapped
    input/output embeddings are saved. True saves the input and output embeddings whatever they are.
    """
    named = not isinstance(target_modules, str) and any(n in (target_modules or ()) for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        save_embedding_layers = named
    if not save_embedding_layers:
        return []
    layers = [getattr(model, getter)() for getter in ("get_input_embeddings", "get_output_embeddings")
              if callable(getattr(model, getter, None))]
    paths = []
    for path, module in model.named_modules():
        wraps = module.base_layer if isinstance(module, LoraLayer) else None
        if any(layer is not None and (layer is module or layer is wraps) for layer in layers):
            if not named or isinstance(module, LoraLayer):
                paths.append(path)
    return paths


# ---- decode: file keys -> model keys -----------------------------------------------------------------------
def decode(file_keys: list[str], layout: Layout, adapter_name: str) -> tuple[dict[str, str], list[str]]:
    """({file key: model key}, [file keys with no place in the model]) for loading into ``adapter_name``."""
    mapping, unexpected = {}, []
    containers = _containers()
    bare = (*PARAMETER_CONTAINERS, *variant_containers())  # <container>.<name>, no tail
    for key in file_keys:
        model_key = _decode_one(key, layout, adapter_name, containers, bare) if key.startswith(PREFIX) else None
        if model_key is None:
            unexpected.append(key)
        else:
            mapping[key] = model_key
    return mapping, unexpected


def _decode_one(key: str, layout: Layout, adapter_name: str, containers: tuple[str, ...], bare: tuple[str, ...]
                ) -> str | None:
    path = key[len(PREFIX):].removesuffix("." + DELTA)
    if key.endswith("." + DELTA) and path in layout.token_paths | layout.tied_token_paths:
        return f"{key}.{adapter_name}"
    parts = key[len(PREFIX):].split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        if part in containers and path in layout.lora_paths:
            rest = parts[i + 1:]
            if part == MAGNITUDE and rest in ([], ["weight"]):
                rest = ["weight"]
            return ".".join([PREFIX + path, part, adapter_name, *rest]) if rest or part in bare else None
        if path in layout.saved_paths and part not in WRAPPER_PARTS:
            return f"{PREFIX}{path}.modules_to_save.{adapter_name}.{'.'.join(parts[i:])}"
    if key in layout.shapes:
        return key
    for i in range(len(parts)):  # a base tensor written without ".base_layer" (older PEFT)
        path = ".".join(parts[:i])
        candidate = f"{PREFIX}{path}.base_layer.{'.'.join(parts[i:])}"
        if path in layout.lora_paths and candidate in layout.shapes:
            return candidate
        if path in layout.saved_paths and parts[i] == "modules_to_save":  # PEFT's bias="all" quirk
            return f"{PREFIX}{path}.modules_to_save.{adapter_name}.{'.'.join(parts[i + 1:])}"
    return None


def required_keys(layout: Layout, adapter_name: str) -> set[str]:
    """Model keys an adapter file must provide: every LoRA tensor and modules_to_save copy of the adapter."""
    return set(encode(layout, adapter_name, bias="none"))
