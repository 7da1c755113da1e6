"""Combine LoRA adapters into a new one: PEFT's ``add_weighted_adapter``.

Merging rules, on task tensors t_1..t_n (n, ...) with weights w_i and density ρ ∈ (0, 1]:

    linear           t = Σ w_i t_i                                           (task arithmetic)
    magnitude_prune  t = Σ w_i M(t_i)       M keeps the ⌊ρ·numel⌋ entries of largest |t_i|, zeroes the rest
    ties             t = Σ_i w_i M(t_i) m_i / max(Σ_i m_i, 1)                (arXiv:2306.01708)
                     m_i = [sign M(t_i) = σ],  σ = sign Σ_i M(t_i) ("total") or sign Σ_i sign M(t_i)
                     ("frequency"), σ = +1 on a tie; the sign is elected before weighting, as in PEFT
    dare_linear      linear on D(t_i) = t_i ⊙ Bernoulli(ρ) / ρ                (arXiv:2311.03099)
    dare_ties        ties with D in place of M

What the task tensors are, per LoRA layer, for the adapters i present there (factors A_i (r_i, in, *k),
B_i (out, r_i, *1), scaling s_i; X̄ = X.flatten(1) is the matrix form, so B̄ Ā is ΔW as an (out, in·k) matrix
for every kind, Linear, GPT-2 Conv1D, Embedding and ConvNd alike):

    factor-wise  (linear, ties, dare_*, magnitude_prune)   needs equal ranks; new rank r
        A = C({A_i}, {sign(w_i s_i) √|w_i s_i|}),   B = C({B_i}, {√|w_i s_i|})
        B A = Σ w_i s_i B_i A_i only for one adapter; otherwise cross terms B_i A_j appear (PEFT's approximation)
    cat          new rank Σ r_i, exact:  A = [w_1 s_1 A_1; ...; w_n s_n A_n],  B = [B_1 ... B_n],  B A = Σ w_i s_i B_i A_i
    *_svd        new rank svd_rank or max r_i:  ΔW = C({s_i B̄_i Ā_i}, {w_i}) (out, in·k) ≈ U_r S_r V_rᵀ,
                 B = U_r S_r,  A = V_rᵀ;  with svd_clamp = q both are clamped to [-h, h], h = the q-quantile
                 of all entries of B and A together. C runs on ΔW in the base weight's layout, so DARE
                 draws PEFT's masks from the same seed.

The new adapter has r = lora_alpha = its rank and no rsLoRA, so its scaling is 1: the weights above carry
every source scaling. Factors smaller than the new rank (rank_pattern layers, svd_rank > min(out, in·k))
are zero-padded. A single adapter is always combined "linear" (exact), as in PEFT.

Where lorakit differs from PEFT 0.21.2, on purpose: an existing ``adapter_name`` raises (PEFT returns
silently); rsLoRA sources give the exact update (PEFT keeps use_rslora and scales the result by √rank);
lora_bias is combined as Σ w_i s_i b_i (PEFT leaves the new bias as initialised); svd_rank above
min(out, in·k) and layers no source adapts work (zero padding / zero factors) where PEFT fails; invalid
arguments, unequal layer ranks and grouped convs are refused up front, before anything is changed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import explain, warn
from .inits import INITS
from .layer import LoraLayer, named_lora_layers
from .saved_modules import ModulesToSaveWrapper


class LoraModel(Protocol):
    """What combining needs of the tuner (``tuner.LoraModel``; a Protocol, so this module does not import it)."""

    model: nn.Module
    peft_config: dict[str, LoraConfig]

    def inject_adapter(self, adapter_name: str, config: LoraConfig) -> None: ...


WHERE = "add_weighted_adapter"


# ---- pruning and sign election on one stack of task tensors ---------------------------------------------
def _density(density: float | None) -> float:
    """``density`` of a pruning type (``check_density`` refused None before any combining)."""
    if density is None:
        raise ValueError(explain("a pruning combination_type needs a density", where=WHERE, fix="pass e.g. density=0.5"))
    return density


def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """M(t): keep the k = ⌊ρ·numel⌋ entries of largest |t| (ties broken by ``topk``), zero the rest."""
    if density >= 1:
        return t
    flat = t.flatten()
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return (flat * keep).view_as(t)


def prune_random(t: Tensor, density: float) -> Tensor:
    """D(t) = t ⊙ m / ρ with m ~ Bernoulli(ρ) elementwise (global RNG), so E[D(t)] = t; identity at ρ = 1."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


SIGN_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "total": lambda tasks: tasks.sum(dim=0),  # σ = sign Σ_i t_i: mass decides
    "frequency": lambda tasks: tasks.sign().sum(dim=0),  # σ = sign Σ_i sign t_i: head count decides
}


def majority_sign_mask(tasks: Tensor, method: str) -> Tensor:
    """m_i = [sign t_i = σ] for tasks (n, ...), σ = +1 where the score is >= 0; zeros never agree."""
    sigma = torch.where(SIGN_SCORES[method](tasks) >= 0, 1.0, -1.0)
    return tasks.sign() == sigma


def weighted_stack(tasks: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """(w_i t_i)_i stacked on a new first dimension: (n, ...)."""
    stacked = torch.stack(list(tasks))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


def disjoint_mean(tasks: Sequence[Tensor], weights: Sequence[float], method: str) -> Tensor:
    """TIES's merge: Σ_i w_i t_i m_i / max(Σ_i m_i, 1) with m the majority-sign mask of the unweighted t_i."""
    mask = majority_sign_mask(torch.stack(list(tasks)), method)
    return (weighted_stack(tasks, weights) * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


# ---- the merging rules: (tasks, weights, density, majority_sign_method) -> merged tensor -------------------
Combiner = Callable[[Sequence[Tensor], Sequence[float], "float | None", str], Tensor]


def task_arithmetic(tasks: Sequence[Tensor], weights: Sequence[float], density: float | None = None,
                    majority_sign_method: str = "total") -> Tensor:
    """t = Σ w_i t_i (density and sign method unused)."""
    return weighted_stack(tasks, weights).sum(dim=0)


def magnitude_prune(tasks: Sequence[Tensor], weights: Sequence[float], density: float | None,
                    majority_sign_method: str = "total") -> Tensor:
    """t = Σ w_i M(t_i)."""
    return task_arithmetic([prune_magnitude(t, _density(density)) for t in tasks], weights)


def ties(tasks: Sequence[Tensor], weights: Sequence[float], density: float | None,
         majority_sign_method: str = "total") -> Tensor:
    """TIES: t = Σ_i w_i M(t_i) m_i / max(Σ_i m_i, 1), m_i the majority-sign mask (module docstring)."""
    return disjoint_mean([prune_magnitude(t, _density(density)) for t in tasks], weights, majority_sign_method)


def dare_linear(tasks: Sequence[Tensor], weights: Sequence[float], density: float | None,
                majority_sign_method: str = "total") -> Tensor:
    """DARE: t = Σ w_i D(t_i), D(t) = t ⊙ Bernoulli(ρ) / ρ."""
    return task_arithmetic([prune_random(t, _density(density)) for t in tasks], weights)


def dare_ties(tasks: Sequence[Tensor], weights: Sequence[float], density: float | None,
              majority_sign_method: str = "total") -> Tensor:
    """DARE pruning, then TIES's sign election and disjoint mean."""
    return disjoint_mean([prune_random(t, _density(density)) for t in tasks], weights, majority_sign_method)


COMBINERS: dict[str, Combiner] = {
    "linear": task_arithmetic,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}


# ---- one layer's new factors from its sources ---------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One source adapter in one layer: factors in PEFT's storage layout (float32), scaling and user weight."""

    A: Tensor  # (r, in, *k); (r, num_embeddings) for an Embedding
    B: Tensor  # (out, r, *1); (embedding_dim, r) for an Embedding
    scaling: float
    weight: float
    stored_in_out: bool = False  # the base stores ΔW as (in, out): GPT-2 Conv1D, Embedding


@dataclass(frozen=True)
class CombineOptions:
    combiner: str  # key of COMBINERS
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def combine_factors(sources: Sequence[Source], options: CombineOptions) -> tuple[Tensor, Tensor]:
    """A = C({A_i}, {sign(w_i s_i)√|w_i s_i|}), B = C({B_i}, {√|w_i s_i|}); C = COMBINERS[options.combiner]."""
    products = [source.weight * source.scaling for source in sources]
    roots = [math.sqrt(abs(p)) for p in products]
    signed_roots = [root if p >= 0 else -root for root, p in zip(roots, products, strict=True)]
    combine = COMBINERS[options.combiner]
    A = combine([s.A for s in sources], signed_roots, options.density, options.majority_sign_method)
    B = combine([s.B for s in sources], roots, options.density, options.majority_sign_method)
    return A, B


def concat_factors(sources: Sequence[Source], options: CombineOptions) -> tuple[Tensor, Tensor]:
    """A = [w_1 s_1 A_1; ...; w_n s_n A_n] (Σ r_i, in, *k),  B = [B_1 ... B_n] (out, Σ r_i, *1): B A exact."""
    A = torch.cat([source.A * source.weight * source.scaling for source in sources], dim=0)
    B = torch.cat([source.B for source in sources], dim=1)
    return A, B


def clamp_quantile(A: Tensor, B: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Clamp both factors to [-h, h], h = the q-quantile of all their (signed) entries together (PEFT's rule)."""
    h = torch.quantile(torch.cat([B.flatten(), A.flatten()]), q)
    return A.clamp(-h, h), B.clamp(-h, h)


def combine_svd(sources: Sequence[Source], options: CombineOptions) -> tuple[Tensor, Tensor]:
    """ΔW = C({s_i B̄_i Ā_i}, {w_i}) (out, in·k) ≈ U_r S_r V_rᵀ;  B = U_r S_r (out, r, *1), A = V_rᵀ (r, in, *k).

    r is ``options.rank`` capped by min(out, in·k) (the caller zero-pads the rest). C runs on ΔW in the base
    weight's layout, transposed for (in, out) storage, so DARE draws the same masks as PEFT for a given seed.
    """
    transposed = sources[0].stored_in_out

    def layout(matrix: Tensor) -> Tensor:  # (out, in·k) <-> the base weight's (in, out) storage
        return matrix.T if transposed else matrix

    deltas = [layout(source.scaling * (source.B.flatten(1) @ source.A.flatten(1))) for source in sources]
    delta = layout(COMBINERS[options.combiner](deltas, [s.weight for s in sources], options.density,
                                               options.majority_sign_method))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=options.svd_full_matrices, driver=options.svd_driver)
    r = min(options.rank, S.shape[0])
    A, B = Vh[:r], U[:, :r] * S[:r]  # (r, in·k), (out, r)
    if options.svd_clamp is not None:
        A, B = clamp_quantile(A, B, options.svd_clamp)
    A_shape, B_shape = sources[0].A.shape, sources[0].B.shape
    return A.reshape(r, *A_shape[1:]), B.reshape(B_shape[0], r, *B_shape[2:])


# ---- combination types: how a layer is built, with which rule, and the new rank ------------------------
RankRule = Callable[[dict[str, int], "int | None"], int]


def equal_rank(ranks: dict[str, int], svd_rank: int | None) -> int:
    """Factor-wise merging adds factors entry by entry: every source must have the same r, which is kept."""
    if len(set(ranks.values())) != 1:
        raise ValueError(
            explain("adapters of different rank cannot be merged factor-wise", where=WHERE, got=ranks,
                    expected="the same r (max of r and rank_pattern) for every adapter",
                    fix="use combination_type='cat' or one of the '*_svd' types")
        )
    return next(iter(ranks.values()))


@dataclass(frozen=True)
class CombinationType:
    """One ``combination_type``: the layer builder, the merging rule it applies, and the new rank."""

    build: Callable[[Sequence[Source], CombineOptions], tuple[Tensor, Tensor]]
    combiner: str  # key of COMBINERS ("linear" for cat, where it is unused)
    rank: RankRule

    @property
    def needs_density(self) -> bool:
        return self.combiner != "linear"


def svd_rank_or_max(ranks: dict[str, int], svd_rank: int | None) -> int:
    """Truncated SVD keeps ``svd_rank`` singular triplets, by default as many as the largest source rank."""
    return svd_rank or max(ranks.values())


def sum_of_ranks(ranks: dict[str, int], svd_rank: int | None) -> int:
    """Concatenation stacks every source's r_i rows: rank Σ r_i (may grow large with many adapters)."""
    return sum(ranks.values())


COMBINATION_TYPES: dict[str, CombinationType] = {
    "svd": CombinationType(combine_svd, "linear", svd_rank_or_max),
    "linear": CombinationType(combine_factors, "linear", equal_rank),
    "cat": CombinationType(concat_factors, "linear", sum_of_ranks),
}
for _rule in COMBINERS:  # each pruning rule, factor-wise ("ties") and through SVD ("ties_svd")
    if _rule != "linear":
        COMBINATION_TYPES[_rule] = CombinationType(combine_factors, _rule, equal_rank)
        COMBINATION_TYPES[f"{_rule}_svd"] = CombinationType(combine_svd, _rule, svd_rank_or_max)


# ---- argument checks ---------------------------------------------------------------------------------------
def check_names(tuner: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    """Raises ValueError: no adapters, unknown names, len(weights) != len(adapters), adapter_name taken."""
    known = list(tuner.peft_config)
    unknown = [name for name in adapters if name not in tuner.peft_config]
    problems = [
        (not adapters, "no adapters to combine", adapters, f"a non-empty list of names from {known}"),
        (bool(unknown), f"unknown adapter(s) {unknown}", list(adapters), f"names from {known}"),
        (len(weights) != len(adapters), "adapters and weights differ in length", len(weights),
         f"one weight per adapter ({len(adapters)})"),
        (adapter_name in tuner.peft_config, f"adapter {adapter_name!r} already exists", adapter_name,
         "a new name (PEFT silently does nothing here; lorakit refuses)"),
        (any(tuner.peft_config[n].use_bdlora is not None for n in adapters if n in tuner.peft_config),
         "BD-LoRA adapters cannot be combined", list(adapters),
         "plain LoRA sources (their compact block-diagonal factors are not B and A; merge them instead)"),
        (any(tuner.peft_config[n].use_dora for n in adapters if n in tuner.peft_config),
         "DoRA adapters cannot be combined", list(adapters),
         "plain LoRA sources (a magnitude vector has no weighted-sum meaning; merge them instead)"),
    ]
    for failed, what, got, expected in problems:
        if failed:
            raise ValueError(explain(what, where=WHERE, got=got, expected=expected))


def check_options(combination_type: str, svd_rank: int | None, svd_clamp: float | None, density: float | None,
                  majority_sign_method: str) -> None:
    """Raises ValueError: unknown combination_type or sign method, svd_rank < 1, svd_clamp or density out of range."""
    checks = [
        (combination_type in COMBINATION_TYPES, "combination_type", combination_type,
         f"one of {list(COMBINATION_TYPES)}"),
        (majority_sign_method in SIGN_SCORES, "majority_sign_method", majority_sign_method, f"one of {list(SIGN_SCORES)}"),
        (svd_rank is None or (isinstance(svd_rank, int) and svd_rank >= 1), "svd_rank", svd_rank,
         "None (max rank of the adapters) or an int >= 1"),
        (svd_clamp is None or 0 <= svd_clamp <= 1, "svd_clamp", svd_clamp, "None or a quantile in [0, 1]"),
        (density is None or 0 < density <= 1, "density", density, "a fraction in (0, 1]"),
    ]
    for ok, name, got, expected in checks:
        if not ok:
            raise ValueError(explain(f"invalid {name}", where=WHERE, got=got, expected=expected))


def check_density(combination_type: str, density: float | None) -> None:
    """Raises ValueError: a pruning type without density."""
    if COMBINATION_TYPES[combination_type].needs_density and density is None:
        raise ValueError(
            explain(f"combination_type={combination_type!r} prunes and needs a density", where=WHERE, got=density,
                    expected="a fraction in (0, 1] of entries to keep", fix="pass e.g. density=0.5")
        )


def check_modules_to_save(tuner: LoraModel, adapters: Sequence[str]) -> None:
    """Raises ValueError: two of the adapters train their own copy of the same module (those cannot merge)."""
    clashes = [path for path, module in tuner.model.named_modules() if isinstance(module, ModulesToSaveWrapper)
               and sum(name in module.modules_to_save for name in adapters) > 1]
    if clashes:
        raise ValueError(
            explain("several adapters have their own copy of the same modules_to_save module", where=WHERE,
                    got=clashes, expected="at most one adapter per modules_to_save module",
                    fix="full copies cannot be merged; combine adapters that do not share modules_to_save")
        )


def check_layers(tuner: LoraModel, adapters: Sequence[str], combination: CombinationType) -> None:
    """Raises ValueError listing every layer whose source factors the combination cannot use."""
    problems = []
    for path, layer in named_lora_layers(tuner.model):
        factors = {name: factor_weights(layer, name) for name in adapters if name in layer.r}
        problem = LAYER_CHECKS[combination.build](factors)
        if problem:
            problems.append(f"{path}: {problem}")
    if problems:
        raise ValueError(
            explain("these layers cannot be combined", where=WHERE, got=problems,
                    fix="pick a combination_type the layers allow (see each reason)")
        )


def _same_shapes(factors: dict[str, tuple[Tensor, Tensor]]) -> str | None:
    shapes = {name: tuple(A.shape) for name, (A, _) in factors.items()}
    if len(set(shapes.values())) <= 1:
        return None
    return f"factor-wise merging needs equal lora_A shapes, got {shapes}; 'cat' and '*_svd' types allow any ranks"


def _composable(factors: dict[str, tuple[Tensor, Tensor]]) -> str | None:
    bad = {name: (tuple(B.shape), tuple(A.shape)) for name, (A, B) in factors.items()
           if B.flatten(1).shape[1] != A.shape[0]}  # grouped convs: B holds r/groups channels per group
    if not bad:
        return None
    return f"(B, A) shapes {bad} do not compose as a matrix product B A (grouped conv); only factor-wise types apply"


LAYER_CHECKS: dict[Callable[..., object], Callable[[dict[str, tuple[Tensor, Tensor]]], str | None]] = {
    combine_factors: _same_shapes,
    concat_factors: _composable,  # the rank channels of B's groups would no longer line up with A's
    combine_svd: _composable,
}


# ---- the new adapter -----------------------------------------------------------------------------------------
def max_rank(config: LoraConfig) -> int:
    """The largest rank an adapter has in any layer: max(r, rank_pattern values), as PEFT sizes the result."""
    return max([config.r, *(int(r) for r in (config.rank_pattern or {}).values())])


def union_targets(configs: dict[str, LoraConfig]) -> set[str] | str:
    """Sets of names: their union. Regexes: ``(re_1)|(re_2)|...``. A mix of both is refused, as in PEFT.

    Raises:
        ValueError: some adapters target by regex string and others by a list of names.
    """
    targets = {name: config.target_modules for name, config in configs.items()}
    if all(isinstance(t, str) for t in targets.values()):
        return "|".join(f"({t})" for t in targets.values())
    if all(isinstance(t, (set, list, tuple)) for t in targets.values()):
        return {name for t in targets.values() for name in (t or ())}
    raise ValueError(
        explain("cannot union target_modules of different types", where=WHERE,
                got={name: type(t).__name__ for name, t in targets.items()},
                expected="all regex strings or all lists/sets of names", fix="re-create one adapter with the other form")
    )


def combined_config(tuner: LoraModel, adapters: Sequence[str], rank: int) -> LoraConfig:
    """The first adapter's config with r = lora_alpha = rank (scaling 1), no patterns, the union of targets.

    use_rslora is turned off: with it the scaling would be √rank, not 1 (PEFT keeps it and so scales the
    combined update by √rank).
    """
    first = tuner.peft_config[adapters[0]]
    # an init that rewrites W or needs data is not repeated (Init.repeatable): the combined factors overwrite it
    init = first.init_lora_weights if INITS[first.init_method.name].repeatable else True
    return dataclasses.replace(
        first, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        target_modules=union_targets({name: tuner.peft_config[name] for name in adapters}), init_lora_weights=init,
    )


def factor_weights(layer: LoraLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    """(A, B) of one adapter as tensors in PEFT's storage layout (the weights of lora_A/B, or the embedding factors)."""
    return layer.kind.factor_weights(*layer.factors(adapter_name))


def fill_layer(layer: LoraLayer, adapter_name: str, adapters: Sequence[str], weights: Sequence[float],
               combination: CombinationType, options: CombineOptions) -> None:
    """Write the combined factors into ``adapter_name``'s (zeroed) factors of one layer, padding the rank.

    A layer none of the sources adapts gets zero factors: the sum over no adapters is 0 (PEFT raises here).
    """
    sources = [
        Source(A.detach().float(), B.detach().float(), layer.scaling[name], weight,
               stored_in_out=layer.kind.weight_is_in_out or layer.kind.embedding)
        for name, weight in zip(adapters, weights, strict=True) if name in layer.r
        for A, B in [factor_weights(layer, name)]
    ]
    A_new, B_new = factor_weights(layer, adapter_name)
    with torch.no_grad():
        A_new.zero_()
        B_new.zero_()
        if sources:
            A, B = combination.build(sources, options)
            A_new[: A.shape[0]].copy_(A)  # (r', in, *k) into (rank, in, *k)
            B_new[:, : B.shape[1]].copy_(B)  # (out, r', *1) into (out, rank, *1)
        fill_bias(layer, adapter_name, adapters, weights)


def fill_bias(layer: LoraLayer, adapter_name: str, adapters: Sequence[str], weights: Sequence[float]) -> None:
    """lora_bias: b = Σ w_i s_i b_i over the sources that have one (PEFT leaves the new bias as initialised)."""
    def lora_bias(name: str) -> Tensor | None:
        return getattr(layer.lora_B[name], "bias", None) if name in layer.lora_B else None

    bias = lora_bias(adapter_name)
    if bias is None:
        return
    bias.zero_()
    for name, weight in zip(adapters, weights, strict=True):
        source_bias = lora_bias(name)
        if source_bias is not None:
            bias.add_((weight * layer.scaling[name] * source_bias.float()).to(bias.dtype))


def warn_uncovered(tuner: LoraModel, adapters: Sequence[str], adapter_name: str) -> None:
    """Warn when source layers are outside the new adapter (its layer filters are the first adapter's)."""
    left_out = [path for path, layer in named_lora_layers(tuner.model)
                if adapter_name not in layer.r and any(name in layer.r for name in adapters)]
    if left_out:
        warn(f"add_weighted_adapter: {len(left_out)} layer(s) adapted by {list(adapters)} are not targeted by the new "
             f"adapter {adapter_name!r} (its layers_to_transform and exclude_modules come from adapter "
             f"{adapters[0]!r}), so their updates are left out: {left_out[:5]}")


def add_weighted_adapter(tuner: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add adapter ``adapter_name`` (frozen, inactive) combining ``adapters`` with ``weights`` (module docstring).

    One adapter is always merged "linear" (exact), as in PEFT. Weights may be negative.

    Raises:
        ValueError: unknown or missing adapters, len(weights) != len(adapters), adapter_name already taken,
            invalid combination_type / density / svd_rank / svd_clamp / majority_sign_method, unequal ranks for
            a factor-wise type, regex and list target_modules mixed, shared modules_to_save, or layers whose
            factors the type cannot combine. Nothing is changed when it raises.
    """
    adapters, weights = list(adapters), [float(weight) for weight in weights]
    check_names(tuner, adapters, weights, adapter_name)
    check_options(combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    check_modules_to_save(tuner, adapters)
    effective_type = "linear" if len(adapters) == 1 else combination_type
    check_density(effective_type, density)
    combination = COMBINATION_TYPES[effective_type]
    rank = combination.rank({name: max_rank(tuner.peft_config[name]) for name in adapters}, svd_rank)
    config = combined_config(tuner, adapters, rank)
    check_layers(tuner, adapters, combination)
    tuner.inject_adapter(adapter_name, config)
    options = CombineOptions(combination.combiner, rank, density, majority_sign_method, svd_clamp,
                             svd_full_matrices, svd_driver)
    for _, layer in named_lora_layers(tuner.model):
        if adapter_name in layer.r:
            fill_layer(layer, adapter_name, adapters, weights, combination, options)
    warn_uncovered(tuner, adapters, adapter_name)
