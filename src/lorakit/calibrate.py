"""Data-driven inits: activation hooks on the targeted layers, then a decomposition that sets the factors.

EVA (arXiv:2410.07170), PEFT 0.21.2's ``init_lora_weights="eva"``:

1. ``get_peft_model`` creates every adapter with the registered "eva" init (inits.py): A as LoRA's default,
   B = 0, so the adapted model equals the base before and after calibration.
2. ``get_eva_state_dict`` runs batches through the model (adapters disabled) with a forward hook on each
   Linear / Conv1D LoRA layer. The hook takes the layer input x (..., in), keeps the positions
   ``prepare_model_inputs_fn`` selects (attention mask, and labels != label_mask_value when
   ``use_label_mask``) and accumulates, in float64, n, Σx (in,) and Σxxᵀ (in, in). The centred scatter
   C = Σxxᵀ − n·μμᵀ has eigenpairs (S_i², v_i): v_i are the right-singular vectors of the centred inputs
   (the principal components, as PEFT's IncrementalPCA computes them) and S_i² / tr(C) is the explained
   variance ratio. This is exact and needs O(in²) memory per layer whatever the number of tokens; PEFT's
   IncrementalPCA with a randomised SVD approximates the same quantities.
3. Layers whose inputs are equal on the first batch (q/k/v, gate/up) share one accumulator.
4. After each batch: each layer may take up to round(ρ·r) components; all candidates of all layers are
   ranked by explained variance ratio and the top Σ_layers r win (PEFT's budget: the total rank stays
   what ``r`` / ``rank_pattern`` give; a layer gets 0 .. round(ρ·r)). A layer stops being recorded once its
   assigned components have cosine similarity >= τ to those of the previous batch. Calibration stops
   when every layer has converged, or after one pass over the dataloader: the statistics are then exact for
   the whole data set, so, unlike PEFT, lorakit does not cycle the dataloader again (repeating the data
   would not change C).
5. ``initialize_lora_eva_weights`` sets A = the top-k components (rows, PEFT's sign convention: the
   largest-magnitude entry of each row is positive; ``whiten`` divides row i by √S_i), B = 0, rebuilds
   adapters whose rank changed (alpha scaled by new_r / r when ``adjust_scaling_factors``, so s is kept),
   removes adapters that got rank 0 and records ``rank_pattern``, ``alpha_pattern`` and ``target_modules``
   in the adapter's config so that it saves and reloads. Embedding and convolution targets are not
   calibrated; they get LoRA's default init, with a warning (as in PEFT).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .codec import PREFIX
from .config import EvaConfig, InitMethod, LoraConfig
from .errors import explain, warn
from .kinds import Kind
from .layer import named_lora_layers
from .targeting import layer_spec, resolve_targets
if TYPE_CHECKING:
    from .model import PeftModel

_RHO_THRESHOLD = 1000

# the three hooks of get_eva_state_dict, PEFT's signatures: (model, batch) -> anything; (batch, config) -> what the
# layer hooks receive as model_input; (layer input, model_input, layer name) -> the (k, in) rows to record
ForwardFn = Callable[[nn.Module, Any], Any]
ModelInputsFn = Callable[[Any, LoraConfig], Any]
LayerInputsFn = Callable[[Any, Any, str], Tensor]


# ---- what the hooks see (PEFT's defaults for language modelling) ------------------------------------------
def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, Any], peft_config: LoraConfig) -> Tensor:
    """Indices (k, 2) of the (batch, position) pairs to use: attention mask, and labels != label_mask_value."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs the batch as a dict of tensors")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = _eva(peft_config)
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    indices: Tensor = mask.nonzero()
    return indices


def _eva(peft_config: LoraConfig) -> EvaConfig:
    """The config's EvaConfig: LoraConfig sets one for init_lora_weights="eva"; a None (another init) fails on
    its first attribute, as in PEFT."""
    return cast(EvaConfig, peft_config.eva_config)


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Tensor, layer_name: str) -> Tensor:
    """The layer input rows at the indices from ``prepare_model_inputs_fn_language_modeling``: (k, in)."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


def _first_tensor(layer_input: Any, layer_name: str) -> Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, Tensor):
        raise TypeError(explain("unsupported layer input for EVA", where=layer_name, got=type(layer_input).__name__,
                                fix="pass a prepare_layer_inputs_fn that returns a 2-D tensor"))
    return layer_input


def _default_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> Tensor:
    """Without a prepare_model_inputs_fn: every row, flattened to (tokens, in)."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


# ---- the statistics -------------------------------------------------------------------------------------
class _Moments:
    """n, Σx and Σxxᵀ of the rows seen, in float64; ``pca`` gives the principal components from them."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.gram: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        assert self.gram is not None  # set with self.sum
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.gram += x.T @ x

    def pca(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(components (k, in), singular values S (k,), explained variance ratios (k,)), largest first.

        C = Σxxᵀ − n·μμᵀ = V diag(S²) Vᵀ; components are the rows of Vᵀ, each signed so its largest-magnitude
        entry is positive (sklearn's / PEFT's ``svd_flip(u_based_decision=False)``).
        """
        assert self.sum is not None and self.gram is not None, "pca before any rows"  # get_eva_state_dict checks
        mean = self.sum / self.n
        scatter = self.gram - self.n * torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh((scatter + scatter.T) / 2)
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
        components = eigvecs[:, :k].T
        pivot = components.abs().argmax(dim=1)
        signs = torch.sign(components.gather(1, pivot[:, None]))
        components = components * torch.where(signs == 0, 1.0, signs)
        total = eigvals.sum()
        ratio = eigvals[:k] / total if total > 0 else torch.zeros_like(eigvals[:k])
        return components, eigvals[:k].sqrt(), ratio


class _Recorder:
    """Forward hook: accumulates one layer's prepared inputs while ``active``."""

    def __init__(self, name: str, prepare: LayerInputsFn) -> None:
        self.name, self.prepare = name, prepare
        self.model_input: Any = None
        self.moments = _Moments()
        self.active = True
        self.first: Tensor | None = None  # the first batch's inputs, kept only to find layers with equal inputs
        self.keep_first = True  # until get_eva_state_dict has compared the first batch's inputs

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.active:
            return
        x = self.prepare(args, self.model_input, self.name)
        if self.keep_first:
            self.first = x.detach().clone()
        self.moments.add(x)


def _rank_distribution(ratios: dict[str, Tensor], layer_map: dict[str, str], equal_map: dict[str, str],
                       budget: int, max_components: dict[str, int]) -> dict[str, int]:
    """PEFT's rule: the ``budget`` largest explained-variance ratios over all layers' candidates win.

    Layer ``k`` contributes its first ``max_components[k]`` ratios (those of the layer it shares inputs with);
    ties keep layer order (stable sort); a layer sharing another's inputs never gets more than that layer.
    """
    keys, values = zip(*[(k, v) for k, source in layer_map.items() for v in ratios[source][: max_components[k]]], strict=True)
    order = torch.stack(values).argsort(descending=True, stable=True)
    counts = {k: 0 for k in layer_map}
    for i in order[:budget].tolist():
        counts[keys[i]] += 1
    for k, source in equal_map.items():
        if counts[source] < counts[k]:
            counts[source], counts[k] = counts[k], counts[source]
    return counts


def _move(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]  # a Mapping subclass built from a dict (dict, BatchEncoding)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def calibrated_targets(model: nn.Module, config: LoraConfig) -> dict[str, Kind]:
    """{module name: Kind} of ``config``'s targets in the plain ``model`` that EVA, CorDA and LoRA-GA calibrate
    (``Kind.calibrated``: Linear / Conv1D; PEFT skips Embedding and convolution targets too)."""
    plan = resolve_targets(model, config)
    return {n: plan.kinds[n] for n in plan.layers if plan.kinds[n].calibrated}


def _eva_targets(model: nn.Module, peft_config: LoraConfig, is_peft: bool) -> list[str]:
    """Module names to calibrate: LoRA layers of a Linear-like kind, or (plain model) the config's targets."""
    if is_peft:
        return [n for n, layer in named_lora_layers(model) if layer.kind.calibrated]
    return list(calibrated_targets(model, peft_config))


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: LoraConfig | None = None,
    forward_fn: ForwardFn | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFn | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputsFn | dict[str, LayerInputsFn] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, Tensor]:
    """EVA's A for each calibrated layer: {module name: (k, in) components}, k its assigned rank (may be 0).

    ``model`` is a PeftModel (names then start with "base_model.model.") or a plain model with
    ``peft_config``. Arguments as in PEFT; ``gather_distributed_inputs`` and ``show_progress_bar`` are
    accepted and ignored (single process, no progress bar). A ``prepare_layer_inputs_fn`` mapping gives the layers
    it does not name PEFT's default: every row of the input, flattened to (tokens, in). See the module docstring
    for the method.

    Raises:
        ValueError: an empty dataloader, no peft_config for a plain model, no calibrated layer, or a
            prepare_layer_inputs_fn mapping naming modules that are not calibrated.
    """
    is_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = cast("PeftModel", model).peft_config[adapter_name]
    if hasattr(dataloader, "__len__") and len(cast(Sized, dataloader)) == 0:
        raise ValueError("dataloader is empty")
    eva = _eva(peft_config)
    rho = eva.rho
    if rho > _RHO_THRESHOLD:  # PEFT's cap for huge rho values
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    names = _eva_targets(model, peft_config, is_peft)
    if not names:
        raise ValueError(explain("EVA found no Linear or Conv1D layer to calibrate", got=peft_config.target_modules))
    if isinstance(prepare_layer_inputs_fn, Mapping):
        unknown = set(prepare_layer_inputs_fn) - set(names)
        if unknown:
            raise ValueError(explain("prepare_layer_inputs_fn names modules that are not calibrated",
                                     got=sorted(unknown), expected=f"names among {names}"))
    if prepare_model_inputs_fn is None and prepare_layer_inputs_fn is prepare_layer_inputs_fn_language_modeling:
        prepare_layer_inputs_fn = _default_layer_inputs

    ranks = {name: layer_spec(name.removeprefix(PREFIX), peft_config).r for name in names}
    max_components = {name: round(r * rho) for name, r in ranks.items()}
    budget = sum(ranks.values())

    params = [p for p in model.parameters() if p.device.type != "meta"]
    device = params[0].device if params else None
    recorders: dict[str, _Recorder] = {}
    handles = []
    for name in names:
        fn = prepare_layer_inputs_fn.get(name, _default_layer_inputs) \
            if isinstance(prepare_layer_inputs_fn, Mapping) else prepare_layer_inputs_fn
        recorders[name] = _Recorder(name, fn or _default_layer_inputs)
        handles.append(model.get_submodule(name).register_forward_hook(recorders[name]))

    def feed(batch: Any) -> None:
        batch = _move(batch, device)
        hook_input = prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None else batch
        for recorder in recorders.values():
            recorder.model_input = hook_input
        forward_fn(model, batch)  # type: ignore[misc]  # PEFT types it Optional and calls it too: None fails here as in PEFT

    training = model.training
    model.eval()
    context = cast("PeftModel", model).disable_adapter() if is_peft and hasattr(model, "disable_adapter") else nullcontext()
    try:
        with context:
            batches = iter(dataloader)
            first = next(batches, None)
            if first is None:
                raise ValueError("dataloader is empty")
            feed(first)
            unreached = [name for name in names if recorders[name].first is None]
            if unreached:
                raise ValueError(explain("EVA saw no input for some calibrated layers", got=unreached,
                                         fix="make forward_fn(model, batch) run a forward pass that reaches every "
                                             "targeted layer, or leave the others out of target_modules"))
            firsts = {name: cast(Tensor, recorders[name].first) for name in names}
            # layers with equal inputs share the first such layer's statistics (PEFT compares a hash instead)
            equal_map: dict[str, str] = {}
            sources: list[str] = []
            for name in names:
                x = firsts[name]
                match = next((s for s in sources if firsts[s].shape == x.shape and torch.equal(firsts[s], x)), None)
                if match is None:
                    sources.append(name)
                else:
                    equal_map[name] = match
            for name in names:
                recorders[name].keep_first, recorders[name].first = False, None
                if name in equal_map:
                    recorders[name].active = False
            for name, source in equal_map.items():
                group = [n for n in names if equal_map.get(n, n) == source]
                max_components[name] = max_components[source] = max(max_components[n] for n in group)
            layer_map = {**{s: s for s in sources}, **equal_map}

            previous: dict[str, Tensor] = {}
            converged = {s: torch.zeros(max_components[s], dtype=torch.bool) for s in sources}
            rank_dist = dict(max_components)
            for batch in batches:
                if all(converged[s][: rank_dist[s]].all() for s in sources):
                    break
                for s in sources:  # a layer whose assigned components converged is no longer recorded
                    recorders[s].active = not bool(converged[s][: rank_dist[s]].all())
                feed(batch)
                ratios = {}
                for s in sources:
                    components, _, ratios[s] = recorders[s].moments.pca(max_components[s])
                    if s in previous and recorders[s].active:
                        sim = torch.nn.functional.cosine_similarity(components, previous[s], dim=1)
                        converged[s] = (sim >= eva.tau).cpu()
                    previous[s] = components
                rank_dist = _rank_distribution(ratios, layer_map, equal_map, budget, max_components)
            # after the loop the statistics cover every batch seen: exact, converged or not
            results = {s: recorders[s].moments.pca(max_components[s]) for s in sources}
            rank_dist = _rank_distribution({s: r[2] for s, r in results.items()}, layer_map, equal_map, budget,
                                           max_components)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)

    state = {}
    for name in names:
        components, singular, _ = results[layer_map[name]]
        k = rank_dist[name]
        u = components[:k].clone()
        if eva.whiten:
            u = u / singular[:k].sqrt().reshape(-1, 1)
        state[name] = u.float().to(device) if device is not None else u.float()
    return state


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, Tensor] | None = None,
    forward_fn: ForwardFn | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFn | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputsFn | dict[str, LayerInputsFn] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Calibrate adapter ``adapter_name`` (created with init_lora_weights="eva") in place; returns ``model``.

    Raises:
        ValueError: not a PeftModel, several active adapters, an adapter not created with "eva", or neither
            a dataloader nor an eva_state_dict.
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    peft_model = cast("PeftModel", model)
    if len(peft_model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    config = peft_model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name)
    _load_eva_state_dict(peft_model, dict(eva_state_dict), adapter_name)
    return model


def _load_eva_state_dict(model: PeftModel, eva_state_dict: dict[str, Tensor], adapter_name: str) -> None:
    """Copy EVA's A into the layers, re-ranking or removing adapters, and record the patterns in the config."""
    tuner = model.base_model
    config = model.peft_config[adapter_name]
    calibrated: list[str] = []
    missing: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, module in named_lora_layers(model, adapter_name):
        path = name.removeprefix(PREFIX)
        spec = layer_spec(path, config)
        r, alpha = spec.r, spec.lora_alpha
        if name in eva_state_dict:
            w = eva_state_dict.pop(name)
            new_rank = w.shape[0]
            if new_rank == 0:  # EVA gave this layer no rank: drop the adapter (and the wrapper if it is empty)
                module.delete_adapter(adapter_name)
                if not module.r:
                    model.set_submodule(name, module.base_layer)
                continue
            if new_rank != r and _eva(config).adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != module.r[adapter_name] or alpha != module.lora_alpha[adapter_name]:
                module.delete_adapter(adapter_name)
                module.update_layer(adapter_name, dataclasses.replace(spec, r=new_rank, lora_alpha=alpha,
                                                                      init=InitMethod("eva")),
                                    autocast_adapter_dtype=tuner.autocast_adapter_dtype)
            A, B = (cast(Tensor, factor[adapter_name].weight) for factor in (module.lora_A, module.lora_B))
            A.copy_(w.reshape(A.shape).to(A))
            B.zero_()
            calibrated.append(path)
        else:  # not calibrated (Embedding, convolution): LoRA's default init, as PEFT
            module.delete_adapter(adapter_name)
            module.update_layer(adapter_name, dataclasses.replace(spec, init=InitMethod("default")),
                                autocast_adapter_dtype=tuner.autocast_adapter_dtype)
            missing.append(path)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[path] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    tuner.peft_config[adapter_name] = dataclasses.replace(
        config, target_modules=calibrated + missing, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    tuner.drop_removed_targets()
    tuner.set_adapter(tuner.active_adapter, inference_mode=tuner._inference_only(tuner.active_adapters))
    if missing:
        warn(f"EVA does not calibrate Embedding or convolution layers; these got init_lora_weights=True instead: "
             f"{missing}")
