"""MonteCLoRA (Monte Carlo LoRA, arXiv:2411.04358, as PEFT 0.21.2 runs it), Linear and GPT-2 Conv1D layers.

In training, A (r, in) is replaced by a Bayesian average of n = num_samples Gaussian perturbations of it,
with learned variances (a Wishart-reparametrised covariance) and learned mixture weights (a Dirichlet,
approximated by a logistic normal); in eval mode the layer is plain LoRA. Per training forward, with one
pre-drawn noise sample z = (Z_k (in, r) ~ N(0, 1), Z_W ~ Wishart(r, I_r), z_D (n,) ~ N(0, 1)):

    Σ   = diag(max(e^{2σ_j} (Z_W)_jj, 10⁻³))                  σ = std_prior (r,); Σ is kept as gaussian_var_prior
    E_k = ε · Z_k Σ^{1/2}                                     ε = sample_scaler; E_k (in, r)
    α   = max(e^{π}, 10⁻⁶),  μ = log α − mean(log α)          π = expert_weights_prior (n,)
    d   = (1/α)(1 − 2/n) + Σ(1/α)/n²  (≥ 10⁻⁶),  ℓ = √(d + 10⁻⁶) ⊙ z_D + μ
    w   = softmax(ℓ)                                          kept as expert_weights
    Ãᵀ  = Σ_k w_k (Aᵀ + E_k)
    y   = base(x) + s · B Ã dropout(x)

A NaN in E or w falls back to A (PEFT's warning). Merging uses A itself (the mean), as PEFT does. The
variational loss of one layer (``MontecloraSampler.variational_loss``; 0 in eval mode), with a = α,
a₀ = dirichlet_prior·1 (n,), v = e^{2σ} (r,), Σ̂ = max(Σ, 10⁻⁶) elementwise (the stored r×r matrix):

    KL_D = lnΓ(Σa) − lnΓ(Σa₀) + Σ(lnΓ(a) − lnΓ(a₀)) + Σ (a − a₀)(ψ(a) − ψ(Σa))
    KL_W = ½ (−r Σ ln v + r Σ v − r²)
    KL_N = n · ½ (tr Σ̂ − Σ_j ln Σ̂_jj − r)
    loss = kl_loss_weight·(KL_D + KL_W + KL_N) + (Σ w² if use_entropy)

and ``LoraModel._get_monteclora_loss`` averages it over the layers holding the named adapters. The noise
is drawn ``buffer_size`` samples at a time, at the first training forward (and again when used up), on
the parameters' device; inference never draws. State-dict keys are PEFT's:
``<path>.lora_monteclora_sampler.<adapter>.{std_prior, expert_weights_prior, gaussian_var_prior, expert_weights}``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Wishart

from ..config import register_subconfig, strict_init
from ..errors import explain
from . import Variant, VariantLayer, adapter_entries, plain_merge, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig
    from ..layer import LayerSpec


@strict_init
@dataclass
class MontecloraConfig:
    """MonteCLoRA's settings (PEFT's ``MontecloraConfig``, same defaults).

    Attributes:
        num_samples: n, the Monte Carlo samples averaged per forward. use_entropy: add Σ w² to the loss.
        dirichlet_prior: the prior concentration a₀ of the mixture weights. sample_scaler: ε, the size of the
        perturbations. kl_loss_weight: the weight of the KL terms. buffer_size: noise samples drawn at once.

    Raises:
        ValueError: num_samples, dirichlet_prior or buffer_size not > 0 (PEFT's sentence first).
    """

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __post_init__(self) -> None:
        for name in ("num_samples", "dirichlet_prior", "buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be greater than 0. " + explain(
                    f"invalid MontecloraConfig.{name}", got=getattr(self, name), expected="a value > 0"))


register_subconfig("monteclora_config", MontecloraConfig)
CONTAINER = "lora_monteclora_sampler"
KINDS = ("Linear", "Conv1D")  # PEFT's lora.Linear, which wraps both


class MontecloraSampler(nn.Module):
    """One adapter's variational parameters (``std_prior`` σ (r,), ``expert_weights_prior`` π (n,)), the last
    sampled Σ and w (buffers, saved as PEFT saves them) and the pre-drawn noise (not saved)."""

    def __init__(self, in_features: int, r: int, settings: MontecloraConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.r, self.settings = in_features, r, settings
        n = settings.num_samples
        self.std_prior = nn.Parameter(torch.rand(r, device=device, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(n, device=device, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(r, device=device, dtype=dtype))
        self.register_buffer("expert_weights", torch.full((n,), 1 / n, device=device, dtype=dtype))
        self.noise: tuple[Tensor, Tensor, Tensor] | None = None  # (Z (B, n, in, r), Z_W (B, r, r), z_D (B, n))
        self.index = 0

    def draw_noise(self) -> None:
        """Fill the noise buffer with ``buffer_size`` samples (Wishart draws in float32, then cast)."""
        size, n, device, dtype = self.settings.buffer_size, self.settings.num_samples, self.std_prior.device, \
            self.std_prior.dtype
        with torch.no_grad():
            z = torch.randn(size, n, self.in_features, self.r, device=device, dtype=dtype)
            z_dirichlet = torch.randn(size, n, device=device, dtype=dtype)
            wishart = Wishart(df=torch.tensor(float(self.r), device=device), scale_tril=torch.eye(self.r, device=device))
            z_wishart = torch.stack([wishart._bartlett_sampling(torch.Size())  # type: ignore[no-untyped-call]  # torch's, untyped
                                     for _ in range(size)]).to(dtype)
        self.noise, self.index = (z, z_wishart, z_dirichlet), 0

    def next_noise(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.noise is None or self.index >= self.noise[0].shape[0]:
            self.draw_noise()
        assert self.noise is not None
        z, z_wishart, z_dirichlet = (t[self.index] for t in self.noise)
        self.index += 1
        return z, z_wishart, z_dirichlet

    def forward(self) -> tuple[Tensor, Tensor]:
        """(E (n, in, r), w (n,)) for one training step (module docstring); stores Σ and w in the buffers."""
        z, z_wishart, z_dirichlet = (t.to(self.std_prior) for t in self.next_noise())
        eps = 1e-3
        v = torch.exp(2 * self.std_prior) * torch.diagonal(z_wishart)  # diag(std Z_W std)
        Sigma = torch.diag(v.clamp_min(eps))
        self.gaussian_var_prior = Sigma
        root = torch.sqrt(torch.diagonal(Sigma).float()).to(Sigma.dtype)  # Cholesky of a diagonal, in float32
        E = torch.nan_to_num(z * root, nan=eps) * self.settings.sample_scaler  # Z_k Σ^{1/2}: (n, in, r)
        n = self.settings.num_samples
        alpha = torch.exp(self.expert_weights_prior).clamp_min(1e-6)
        log_alpha = torch.log(alpha)
        d = ((1 / alpha) * (1 - 2 / n) + (1 / alpha).sum() / n**2).clamp_min(1e-6)
        logits = torch.sqrt((d + 1e-6).float()).to(d.dtype) * z_dirichlet + (log_alpha - log_alpha.mean())
        self.expert_weights = torch.softmax(logits, dim=-1)
        return E, self.expert_weights

    def variational_loss(self) -> tuple[Tensor | float, Tensor | float]:
        """(kl_loss_weight·(KL_D + KL_W + KL_N), Σ w² or 0) in training, (0.0, 0.0) in eval (module docstring)."""
        if not self.training:
            return 0.0, 0.0
        n, r = self.settings.num_samples, self.r
        a = torch.exp(self.expert_weights_prior)
        a0 = torch.full_like(a, self.settings.dirichlet_prior)
        kl_d = (torch.lgamma(a.sum()) - torch.lgamma(a0.sum()) + (torch.lgamma(a) - torch.lgamma(a0)).sum()
                + ((a - a0) * (torch.digamma(a) - torch.digamma(a.sum()))).sum())
        v = torch.exp(2 * self.std_prior)
        kl_w = 0.5 * (-torch.log(v).sum() * r + v.sum() * r - r**2)
        Sigma = self.gaussian_var_prior.clamp_min(1e-6)
        kl_n = n * 0.5 * (torch.diagonal(Sigma).sum() - torch.log(torch.diagonal(Sigma)).sum() - r)
        entropy = self.expert_weights.square().sum() if self.settings.use_entropy else 0
        return self.settings.kl_loss_weight * (kl_d + kl_w + kl_n), entropy


def _monteclora_init(settings: MontecloraConfig, layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor,
                     s: float) -> None:
    """Add the adapter's MontecloraSampler (σ, π ~ U(0, 1) in A's dtype and device).

    Raises:
        ValueError: the layer is not Linear / Conv1D (PEFT's sentence first).
    """
    if layer.kind.name not in KINDS:
        raise ValueError("Invalid or unsupported variant combination: ('monteclora_config',). "
                         + explain("monteclora_config is not supported", where=f"a {layer.kind.name} target",
                                   expected="Linear or Conv1D targets", fix="exclude these modules or drop it"))
    layer.add_container(CONTAINER, nn.ModuleDict())[adapter_name] = MontecloraSampler(layer.in_features, A.shape[0], settings, A.device, A.dtype)


def _monteclora_forward(layer: VariantLayer, adapter_name: str, x: Tensor, y: Tensor) -> Tensor:
    """y + s·B Ã dropout(x), Ã the sampled average of A in training and A itself in eval mode."""
    A, B = layer.factors(adapter_name)
    x = x if x.dtype == A.weight.dtype else x.to(A.weight.dtype)
    weight = A.weight
    if layer.training:
        x = layer.apply_dropout(adapter_name, x)
        E, w = layer.container(CONTAINER)[adapter_name]()  # the adapter's MontecloraSampler
        if torch.isnan(E).any() or torch.isnan(w).any():
            warnings.warn("Monteclora sampling produced NaNs, using base weights.", stacklevel=2)
        else:
            weight = torch.einsum("n,nij->ij", w, weight.T + E).T  # Σ_k w_k (Aᵀ + E_k), transposed: (r, in)
    out: Tensor = y + B(F.linear(x, weight)) * layer.scaling[adapter_name]
    return out


def _monteclora_shapes(n: int, r: int, kind: Kind, base: nn.Module) -> dict[str, Any]:
    return {CONTAINER: {"std_prior": (r,), "expert_weights_prior": (n,), "gaussian_var_prior": (r, r),
                        "expert_weights": (n,)}}


def _monteclora_options(name: str, config: LoraConfig) -> tuple[Any, ...]:
    return dataclasses.astuple(config.monteclora_config)  # hashable, as LayerSpec needs


def _monteclora_variant(spec: LayerSpec) -> Variant:
    settings = MontecloraConfig(*spec.variant_options)
    return dataclasses.replace(MONTECLORA, init=partial(_monteclora_init, settings),
                               shapes=partial(_monteclora_shapes, settings.num_samples, spec.r))


def monteclora_loss(tuner: Any, adapter_names: str | list[str] | None = None) -> Tensor | float:
    """The mean over the layers holding ``adapter_names`` (default: the active adapters) of each sampler's
    KL + entropy terms; 0.0 when none does (PEFT's ``_get_monteclora_loss``)."""
    total: Tensor | float = 0.0
    count = 0
    for _, _, sampler in adapter_entries(tuner, CONTAINER, adapter_names):
        kl, entropy = sampler.variational_loss()
        total, count = total + kl + entropy, count + 1
    return total / count if count else 0.0


# merge: the mean adapter, W ± s·B A without sampling (PEFT's merge)
MONTECLORA: Variant = register_variant("monteclora", Variant(
    init=partial(_monteclora_init, MontecloraConfig()), forward=_monteclora_forward, merge=plain_merge,
    shapes=partial(_monteclora_shapes, 0, 0), bind=_monteclora_variant, options=_monteclora_options,
    select=lambda config: config.monteclora_config is not None, containers=(CONTAINER,),
    model_methods={"_get_monteclora_loss": monteclora_loss}))
