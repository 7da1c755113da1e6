"""Arrow routing over a library of LoRA experts (Ostapenko et al., arXiv:2405.11157), with GenKnowSub
(Bagherifard et al., ACL 2025 short 54), as PEFT 0.21.2 runs them: ``create_arrow_model`` +
``LoraConfig(arrow_config=ArrowConfig(...))``.

A layer holds E task experts (A_e (r, in), B_e (out, r), scaling s_e) and one *router* adapter that owns no
update of its own. Training-free, the router mixes the experts per token:

    p_e = the top right singular vector of ΔW_e = B_e A_e    (in,)  a prototype: the input direction ΔW_e
          stretches most, found by 15 power iterations on v ↦ A_eᵀ(B_eᵀB_e)(A_e v) (never forming ΔW_e);
          v₀ ~ N(0, I) from a generator seeded with rng_seed (the global RNG when None), in float32
    a_te = |⟨x_t, p_e⟩|                                     sign-free similarity of token t to expert e
    c_t  = softmax(top_k(a_t) / T)                           other experts get −∞, hence weight 0
    y_t  = base(x_t) + dropout_router(Σ_e c_te · s_e · B_e A_e x_t)

GenKnowSub ("forgetting via negation"): with general adapters g (names gks_0, gks_1, ...), before the first
routed forward each task expert becomes A_e ← A_e − mean_g A_g, B_e ← B_e − mean_g B_g (in place, once per
expert). Experts are the layer's adapters other than the router and gks_<i>; ones added after the router
are picked up at the next routed forward (prototypes rebuilt, GenKnowSub applied to the new ones only).
Arrow runs on linear kinds and cannot be merged (the mixture changes token by token).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..errors import explain
from ..config import register_subconfig
from . import Variant, VariantLayer, register_variant

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layer import LayerSpec
    from ..model import PeftModel

TASK_ADAPTER_PREFIX, GKS_ADAPTER_PREFIX, ROUTER_NAME = "task_", "gks_", "arrow_router"  # PEFT's names
POWER_ITERATIONS, EPS = 15, 1e-8


@dataclass
class ArrowConfig:
    """Arrow's settings (PEFT's ``ArrowConfig``: same fields and defaults).

    Attributes:
        top_k: experts mixed per token. router_temperature: T of the softmax. use_gks: GenKnowSub.
        task_adapter_names / gks_adapter_names: set by ``create_arrow_model`` (task_<i>, gks_<i>).
        rng_seed: seed of the power iteration's start vector (None: the global RNG).

    Raises:
        ValueError: top_k <= 0 or router_temperature <= 0 (PEFT's sentences first).
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: list[str] | None = field(default=None, init=False)
    gks_adapter_names: list[str] | None = field(default=None, init=False)
    rng_seed: int | None = None

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise ValueError("top_k cannot be negative. " + explain("invalid ArrowConfig.top_k", got=self.top_k,
                                                                     expected="a positive number of experts"))
        if self.router_temperature <= 0:
            raise ValueError("router_temperature must be greater than 0. "
                             + explain("invalid ArrowConfig.router_temperature", got=self.router_temperature))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ArrowConfig:
        """From adapter_config.json. As PEFT, the name lists (init=False) are not read back: a loaded router takes
        its experts from the layers (every adapter but the router and gks_<i>)."""
        return cls(**{k: v for k, v in values.items() if k not in ("task_adapter_names", "gks_adapter_names")})


register_subconfig("arrow_config", ArrowConfig, ArrowConfig.from_dict)
STATE = "lora_arrow"  # PEFT's container of the router's per-layer state


@dataclass(frozen=True)
class _Settings:
    """One router's settings, hashable (``LayerSpec.variant_options``)."""

    top_k: int
    temperature: float
    use_gks: bool
    task_names: tuple[str, ...] | None
    gks_names: tuple[str, ...]
    rng_seed: int | None


class ArrowState(nn.Module):
    """The router's per-layer state (``layer.lora_arrow[router]``): prototypes (non-persistent) and GKS progress."""

    prototypes: Tensor

    def __init__(self, settings: _Settings) -> None:
        super().__init__()
        self.settings = settings
        self.experts: list[str] = list(settings.task_names or [])
        self.prototypes_ready = False
        self.gks_done = False
        self.gks_pending: list[str] = []

    @property
    def task_adapter_names(self) -> list[str]:
        """The experts routed over (PEFT's attribute name)."""
        return list(self.experts)

    def top_right_singular_vec_from_BA(self, A: Tensor, B: Tensor) -> Tensor:
        """One expert's prototype (PEFT's method name); called once per expert each time prototypes are built."""
        return top_right_singular_vector(A, B, self.settings.rng_seed)


def _is_general(name: str) -> bool:
    return name.startswith(GKS_ADAPTER_PREFIX) and name[len(GKS_ADAPTER_PREFIX):].isdigit()


def top_right_singular_vector(A: Tensor, B: Tensor, seed: int | None) -> Tensor:
    """p (in,), float32: the dominant eigenvector of A_eᵀ(BᵀB)A by power iteration (module docstring)."""
    A, B = A.float(), B.float()
    C = B.T @ B  # (r, r)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=A.device.type)
        generator.manual_seed(int(seed))
    v: Tensor = torch.randn(A.shape[1], dtype=A.dtype, device=A.device, generator=generator)
    v = v / (v.norm() + EPS)
    for _ in range(POWER_ITERATIONS):
        w = A.T @ (C @ (A @ v))  # (ΔWᵀΔW) v
        v = w / (w.norm() + EPS)
    return v


def _weights(layer: VariantLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) of one expert."""
    return layer.kind.factor_weights(*layer.factors(adapter_name))


@torch.no_grad()
def _refresh(layer: VariantLayer, state: ArrowState, router: str) -> None:
    """Track experts added since the last forward, run GenKnowSub where due, rebuild prototypes if needed."""
    current = [n for n in layer.r if n != ROUTER_NAME and n != router and not _is_general(n)]
    if sorted(current) != sorted(state.experts):
        if len(current) > len(state.experts):
            state.gks_pending = [n for n in current if n not in state.experts]
        state.experts, state.prototypes_ready = current, False
    settings = state.settings
    if settings.use_gks and (not state.gks_done or state.gks_pending):
        mean_A = torch.stack([_weights(layer, n)[0] for n in settings.gks_names]).mean(0)  # (r, in)
        mean_B = torch.stack([_weights(layer, n)[1] for n in settings.gks_names]).mean(0)  # (out, r)
        for name in state.experts if not state.gks_done else state.gks_pending:
            A, B = _weights(layer, name)
            A.data.sub_(mean_A)
            B.data.sub_(mean_B)
        state.gks_done, state.gks_pending = True, []
    if not state.prototypes_ready:
        prototypes = [state.top_right_singular_vec_from_BA(*_weights(layer, n)).to(_weights(layer, n)[0].dtype)
                      for n in state.experts]
        state.register_buffer("prototypes", torch.stack(prototypes), persistent=False)  # (E, in)
        state.prototypes_ready = True


def _arrow_forward(layer: VariantLayer, router: str, x: Tensor, y: Tensor) -> Tensor:
    """y + dropout(Σ_e c_te s_e B_e A_e x_t) over the top-k experts of each token (module docstring)."""
    state = layer.container(STATE)[router]
    _refresh(layer, state, router)
    experts = state.experts
    A = torch.stack([_weights(layer, n)[0] for n in experts])  # (E, r, in)
    B = torch.stack([_weights(layer, n)[1] for n in experts])  # (E, out, r)
    tokens = x.to(A.dtype).reshape(-1, x.shape[-1])  # (t, in)
    similarity = (tokens @ state.prototypes.T).abs()  # (t, E)
    top, index = torch.topk(similarity, state.settings.top_k, dim=1)
    scores = similarity.new_full(similarity.shape, float("-inf")).scatter(1, index, top)
    c = torch.softmax(scores / state.settings.temperature, dim=1)  # (t, E), 0 outside the top k
    s = torch.tensor([layer.scaling[n] for n in experts], dtype=tokens.dtype, device=tokens.device)  # (E,)
    h = torch.einsum("ti,eri->ter", tokens, A)  # (t, E, r)
    expert_out = torch.einsum("ter,eor->teo", h, B) * s[None, :, None]  # (t, E, out)
    delta = layer.apply_dropout(router, torch.einsum("te,teo->to", c, expert_out))  # (t, out)
    return y + delta.reshape(*x.shape[:-1], delta.shape[-1])


def _arrow_init(settings: _Settings, layer: VariantLayer, router: str, A: Tensor, B: Tensor, s: float) -> None:
    """Give the layer its router state (``lora_arrow``). Raises: ValueError: not a linear kind (PEFT's sentence)."""
    if not layer.kind.linear_like:
        raise ValueError("Invalid or unsupported variant combination: ('arrow_config',) "
                         + explain("Arrow routing is not supported", where=f"a {layer.kind.name} target",
                                   expected="Linear / Conv1D targets", fix="target linear layers only"))
    layer.add_container(STATE, nn.ModuleDict())[router] = ArrowState(settings).to(A.device)


def _arrow_merge(layer: VariantLayer, router: str, W: Tensor, sign: float) -> Tensor:
    """Raises: RuntimeError: always (PEFT's sentence first); the mixture changes token by token."""
    action = "merge" if sign > 0 else "unmerge"
    raise RuntimeError(f"Cannot {action} an active Arrow router adapter. Remove it first. "
                       + explain(f"adapter {router!r} is an Arrow router", where=f"lora.{layer.kind.name}",
                                 fix="delete_adapter() the router, then merge the experts you want"))


def _arrow_options(module_name: str, config: LoraConfig) -> tuple[Any, ...]:
    arrow = config.arrow_config
    names = arrow.task_adapter_names
    return (_Settings(arrow.top_k, float(arrow.router_temperature), bool(arrow.use_gks),
                      tuple(names) if names is not None else None, tuple(arrow.gks_adapter_names or ()),
                      arrow.rng_seed),)


def _arrow_bind(spec: LayerSpec) -> Variant:
    (settings,) = spec.variant_options
    return replace(ARROW, init=partial(_arrow_init, settings))


ARROW: Variant = register_variant("arrow", Variant(
    init=partial(_arrow_init, _Settings(3, 1.0, False, None, (), None)), forward=_arrow_forward,
    merge=_arrow_merge, shapes=lambda kind, base: {}, bind=_arrow_bind, options=_arrow_options,
    select=lambda config: config.arrow_config is not None, containers=(STATE,)))


# ---- building the routed model from saved experts -----------------------------------------------------------
def resolve_adapter_source(path: str) -> tuple[str, str | None]:
    """(model_id, subfolder): a local adapter folder, or a Hub "user/repo[/sub/folder]" path.

    Raises:
        ValueError: a local folder without adapter_config.json (PEFT's sentence first).
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"Local adapter path '{path}' does not contain 'adapter_config.json'. "
                             + explain("not an adapter folder", where=path, fix="pass the folder save_pretrained wrote"))
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return ("/".join(parts), None) if len(parts) == 2 else (path, None)


def _load(model: PeftModel | None, base_model: nn.Module, path: str, adapter_name: str,
          kwargs: dict[str, Any]) -> PeftModel:
    from ..model import PeftModel

    model_id, subfolder = resolve_adapter_source(path)
    options = dict(kwargs)
    if subfolder is not None:
        options.setdefault("subfolder", subfolder)
    if model is None:
        return PeftModel.from_pretrained(base_model, model_id, adapter_name=adapter_name, **options)
    model.load_adapter(model_id, adapter_name=adapter_name, **options)
    return model


def _expert_layout(model: PeftModel, names: list[str]) -> tuple[list[str], int]:
    """(sorted short names of the targeted modules, r), the same for every expert.

    Raises:
        ValueError: the experts differ in rank, factor shapes or targeted modules (PEFT's sentences first).
        TypeError: an expert targets a layer that is not linear (PEFT's sentence first).
    """
    from ..layer import named_lora_layers

    reference: tuple[Any, ...] | None = None
    offenders = []
    for name in names:
        modules, r, shapes = set(), None, None
        for path, layer in named_lora_layers(model, name):
            if not (layer.kind.linear_like or layer.kind.name == "Conv1d"):  # PEFT's list also names nn.Conv1d
                offenders.append((name, path, type(layer.base_layer).__name__))
            if name in layer.lora_A:
                A, B = (cast(Tensor, factor.weight) for factor in layer.factors(name))
                modules.add(path.split(".")[-1])
                r, shapes = A.shape[0], (tuple(A.shape), tuple(B.shape))
        if reference is None:
            reference = (r, shapes, modules)
            continue
        if r != reference[0]:
            raise ValueError(f"[{name}] rank mismatch: {r} != {reference[0]} "
                             + explain("Arrow experts must share one rank", where=name))
        if shapes != reference[1]:
            raise ValueError(f"[{name}] shape mismatch: {shapes} != {reference[1]} "
                             + explain("Arrow experts must have factors of the same shapes", where=name))
        if modules != reference[2]:
            raise ValueError(f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(modules)}\n"
                             f"  reference   -> {sorted(reference[2])}\n"
                             + explain("Arrow experts must target the same modules", where=name))
    if offenders:
        raise TypeError("\n".join(["LoRA adapters must only target Linear-like layers (nn.Linear, nn.Conv1d, HF "
                                   "Conv1D, or bitsandbytes.nn.Linear4bit). Found:"]
                                  + [f"  - adapter '{n}' on module '{p}' of type {t}" for n, p, t in offenders]))
    assert reference is not None
    return sorted(reference[2]), int(reference[0])


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any) -> PeftModel:
    """Load the task experts (task_0, task_1, ...) and, with ``use_gks``, the general ones (gks_0, ...) into
    ``base_model``, then add and activate the "arrow_router" adapter that mixes them (module docstring).

    ``adapter_kwargs`` go to every ``from_pretrained`` / ``load_adapter`` call; a Hub path "user/repo/sub"
    loads from subfolder "sub". ``arrow_config``'s adapter-name lists are filled in, as PEFT does.

    Raises:
        ValueError: no task adapter, use_gks without general adapters, or experts that do not fit together.
        TypeError: an expert targets a non-linear layer.
    """
    from ..config import LoraConfig

    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path "
                         + explain("create_arrow_model got no task experts", got=task_specific_adapter_paths))
    model = None
    for i, path in enumerate(task_specific_adapter_paths):
        model = _load(model, base_model, path, f"{TASK_ADAPTER_PREFIX}{i}", adapter_kwargs)
    assert model is not None
    arrow_config.task_adapter_names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    arrow_config.gks_adapter_names = []
    if arrow_config.use_gks:
        if not general_adapter_paths:
            raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub. "
                             + explain("use_gks=True without general_adapter_paths",
                                       fix="pass general_adapter_paths=[...] or set use_gks=False"))
        for i, path in enumerate(general_adapter_paths):
            _load(model, base_model, path, f"{GKS_ADAPTER_PREFIX}{i}", adapter_kwargs)
        arrow_config.gks_adapter_names = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general_adapter_paths))]
    target_modules, r = _expert_layout(model, arrow_config.task_adapter_names + arrow_config.gks_adapter_names)
    model.add_adapter(ROUTER_NAME, LoraConfig(arrow_config=arrow_config, target_modules=target_modules, r=r))
    model.set_adapter(ROUTER_NAME)
    return model
