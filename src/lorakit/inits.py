"""Registry of init methods for the LoRA factors: pure functions from shapes (and W) to tensors.

Each function receives an ``InitRequest`` and returns an ``InitResult`` (or None to keep the factors as
created). It touches no module and no adapter-name dict; ``LoraLayer`` writes the result in (``write_factor``). A new
method is one registered function plus a test of its invariant; ``layer.py`` does not change. What the rest of
lorakit needs to know about a method (reads W, rewrites W, converts exactly, needs data, is accepted by name, ...)
are the arguments of ``register_init``, kept in its ``init_registry.Init`` entry.

Weight-reading methods (PiSSA, OLoRA, LoftQ) decompose W as an (out, in·k) matrix and return a residual
base weight; like PEFT 0.21.2 they run on Linear and GPT-2 Conv1D layers only: an Embedding gets LoRA's
embedding init (PEFT silently does the same; lorakit warns), a convolution is refused. EVA's pre-calibration
init and CorDA's (which reads the decomposition ``corda.preprocess_corda`` left on the base layer) are
registered at the end; the calibration itself is calibrate.py (EVA) and corda.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import MappingProxyType
from typing import TypeVar

import torch
from torch import Tensor

from .errors import explain, warn
from .init_registry import INITS, Init, InitFn, InitRequest, InitResult
from .nf4 import fake_quantize

__all__ = ["INITS", "Init", "InitFn", "InitRequest", "InitResult", "register_init",
           "write_factor"]


Method = TypeVar("Method", bound=Callable[[InitRequest], "InitResult | None"])  # a method keeps its own signature


def register_init(name: str, *, needs_weight: bool = False, fresh: bool = False,
                  attached: dict[str, str] | None = None, residual: bool = False, exact: bool = False,
                  data_driven: bool = False, repeatable: bool = True, named: bool = True,
                  zeroes_bias: bool = True) -> Callable[[Method], Method]:
    """Decorator: register an init method under the name ``config.parse_init`` produces, with its facts
    (``init_registry.Init`` says what each means); a later registration of a name replaces the earlier one.

    ``fresh=True`` promises that A and B are newly made and referenced nowhere else, so ``write_factor``
    may take their storage instead of copying (no second pass over fresh memory at injection); the other
    methods get nn.Linear's kaiming draws first where the kind skipped them (``_after_peft_draws``).
    """

    def decorate(fn: Method) -> Method:
        INITS[name] = Init(name, fn if fresh else _after_peft_draws(fn), needs_weight=needs_weight, residual=residual,
                           exact=exact, data_driven=data_driven, repeatable=repeatable, named=named,
                           zeroes_bias=zeroes_bias, fresh=fresh, attached=MappingProxyType(dict(attached or {})))
        return fn

    return decorate


def _after_peft_draws(fn: InitFn) -> InitFn:
    """``fn`` preceded by the draws PEFT's nn.Linear factors make (kaiming A, then B), results dropped.

    The cheap inits skip those draws (kinds.py); the others may use the RNG afterwards (orthogonal,
    randomised SVD), and drawing first keeps their results equal to PEFT's for the same seed, at a cost
    that is small next to their decompositions.
    """

    @functools.wraps(fn)
    def init(request: InitRequest) -> InitResult | None:
        if not request.embedding and request.factors_undrawn:
            _kaiming_uniform(request.A_shape)
            _kaiming_uniform(request.B_shape)
        return fn(request)

    return init


def write_factor(factor: Tensor, value: Tensor, adopt: bool) -> None:
    """factor ← value (reshaped to the factor's shape); with ``adopt``, by taking value's storage, no copy."""
    value = value.reshape(factor.shape)
    if adopt and value.dtype == factor.dtype and value.device == factor.device and value.is_contiguous():
        factor.data = value
    else:
        factor.copy_(value)


def _kaiming_uniform(shape: tuple[int, ...]) -> Tensor:
    """U(-b, b), b = 1/sqrt(fan_in): kaiming-uniform with a = sqrt(5), nn.Linear's and nn.ConvNd's default.

    The bound is computed with torch.nn.init's own arithmetic (same numbers, bit for bit), without its
    per-call overhead (a third of an injection's time at small ranks).
    """
    fan_in = shape[1] * math.prod(shape[2:])
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # calculate_gain("leaky_relu", √5)
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return torch.empty(shape).uniform_(-bound, bound)


@register_init("default", fresh=True, exact=True, named=False)
def default(request: InitRequest) -> InitResult:
    """LoRA's init (arXiv:2106.09685): B = 0 so B A = 0 and the adapted model starts as the base.

    Linear/Conv: A ~ kaiming-uniform(a=√5), B = 0.   Embedding: A = 0, B ~ N(0, 1).
    """
    if request.embedding:
        return InitResult(A=torch.zeros(request.A_shape), B=torch.randn(request.B_shape))
    return InitResult(A=_kaiming_uniform(request.A_shape), B=torch.zeros(request.B_shape))


@register_init("gaussian", fresh=True, exact=True)
def gaussian(request: InitRequest) -> InitResult:
    """A ~ N(0, (1/r)²), B = 0 (PEFT's "gaussian"); embeddings as in ``default``."""
    if request.embedding:
        return default(request)
    return InitResult(A=torch.randn(request.A_shape) / request.r, B=torch.zeros(request.B_shape))


@register_init("none", fresh=True, named=False, zeroes_bias=False)
def keep(request: InitRequest) -> InitResult | None:
    """``init_lora_weights=False``: the factors as their layers create them (random, so B A != 0; for tests).

    Linear/Conv1D: A, B ~ kaiming-uniform(a=√5) (kinds.py builds them undrawn).  Others: kept as created.
    """
    if request.embedding or not request.factors_undrawn:
        return None
    return InitResult(A=_kaiming_uniform(request.A_shape), B=_kaiming_uniform(request.B_shape))


# ---- inits that read W: PiSSA, OLoRA, LoftQ (and orthogonal, which only needs the shapes) ------------------
def _layer_name(request: InitRequest) -> str:
    if request.kind:
        return request.kind
    if request.embedding:
        return "Embedding"
    return f"Conv{len(request.A_shape) - 2}d" if len(request.A_shape) > 2 else "Linear"


def _refuse_conv(request: InitRequest, method: str) -> None:
    """PEFT 0.21.2 raises "Unknown initialization" for these inits on ConvNd layers; so do we, clearly."""
    if len(request.A_shape) > 2 and not request.embedding:
        raise ValueError(explain(f"init_lora_weights={method!r} is not supported", where=f"a {_layer_name(request)} "
                                 "target", expected="Linear or Conv1D (GPT-2) targets, as in PEFT",
                                 fix="exclude the convolution (exclude_modules) or use init_lora_weights=True"))


def _embedding_fallback(request: InitRequest, method: str) -> InitResult:
    """PEFT 0.21.2 gives an Embedding LoRA's embedding init for these methods, silently; we say so."""
    warn(f"init_lora_weights={method!r} does not apply to Embedding layers; an Embedding target gets LoRA's "
         "embedding init (A = 0, B ~ N(0, 1)) instead, as in PEFT")
    return default(request)


def _matrix(request: InitRequest, method: str) -> Tensor:
    """The base weight (out, in) after the checks every decomposition needs."""
    _refuse_conv(request, method)
    W = request.weight
    assert W is not None, f"{method} is registered with needs_weight=True"
    if request.r > min(W.shape):
        raise ValueError(explain(f"r={request.r} is too large for init_lora_weights={method!r}",
                                 where=f"a {_layer_name(request)} with weight {tuple(W.shape)}",
                                 expected=f"r <= min(out, in) = {min(W.shape)}", fix="lower r (or its rank_pattern)"))
    return W


def split_svd(U: Tensor, S: Tensor, Vh: Tensor, r: int, s: float) -> tuple[Tensor, Tensor]:
    """(A, B) with s·B A = U_r S_r V_rᵀ: B = U_r √(S_r/s)  (out, r),  A = √(S_r/s) V_rᵀ  (r, in).

    PiSSA, LoftQ and CorDA split their triplets this way; ``loftq.replace_lora_weights_loftq`` with s = 1.
    """
    root = torch.sqrt(S[:r] / s)
    return root[:, None] * Vh[:r], U[:, :r] * root


@register_init("orthogonal")
def orthogonal(request: InitRequest) -> InitResult:
    """Orthogonal init (datta0.github.io/posts/rethink-lora-init), PEFT's "orthogonal": B A = 0, both non-zero.

    Q = qr(X), X ~ N(0, 1) (r, r); rows of Q split into odd Q_o and even Q_e (r/2, r) each, Q_e Q_oᵀ = 0:
    A = (G_A Q_o)ᵀ / 10  (r, in),  B = G_Bᵀ Q_e / 10  (out, r),  G_A ~ N(0, 1) (in, r/2), G_B (r/2, out),
    so B A = G_Bᵀ (Q_e Q_oᵀ) G_Aᵀ / 100 = 0 (up to rounding). Draws in PEFT's order, so a seed gives PEFT's A, B.

    Raises:
        ValueError: r is odd; or the target is a convolution (as in PEFT).
    """
    if request.embedding:
        return _embedding_fallback(request, "orthogonal")
    _refuse_conv(request, "orthogonal")
    r = request.r
    if r % 2:
        raise ValueError(explain("init_lora_weights='orthogonal' needs an even rank", where=_layer_name(request),
                                 got=r, expected="an even r", fix="use an even r (or rank_pattern entry)"))
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(request.A_shape[1], r // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, request.B_shape[0]).T.mm(Q[1::2, :]) / 10.0
    return InitResult(A=A.contiguous(), B=B.contiguous())


@register_init("pissa", needs_weight=True, residual=True, exact=True, repeatable=False)
def pissa(request: InitRequest) -> InitResult:
    """PiSSA (arXiv:2404.02948): the principal singular triplets of W become the adapter.

    W = U S Vᵀ (full SVD; with options {"niter": N} the randomised torch.svd_lowrank(W, q=r, niter=N)),
    B = U_r √(S_r/s)  (out, r),  A = √(S_r/s) V_rᵀ  (r, in),  W_res = W − s·B A  (out, in).
    Invariant: W_res + s·B A == W. As in PEFT, 1/s sits under the root, so s·B A = U_r S_r V_rᵀ for any s.

    Raises:
        ValueError: r > min(out, in), or a convolution target (PEFT refuses those too).
    """
    if request.embedding:
        return _embedding_fallback(request, "pissa")
    W = _matrix(request, "pissa")
    niter = request.options.get("niter")
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(W, q=request.r, niter=niter)
        Vh = V.T
    A, B = split_svd(U, S, Vh, request.r, request.scaling)
    return InitResult(A=A.contiguous(), B=B.contiguous(), base_weight=W - request.scaling * B @ A)


@register_init("olora", needs_weight=True, residual=True, exact=True, repeatable=False)
def olora(request: InitRequest) -> InitResult:
    """OLoRA (arXiv:2406.01775): an orthonormal basis of W's column space becomes B.

    W = Q R (reduced QR; Q (out, k) orthonormal columns, R (k, in) upper triangular, k = min(out, in)),
    B = Q[:, :r]  (out, r),  A = R[:r]  (r, in),  W_res = W − s·B A. Invariant: W_res + s·B A == W.
    No 1/s in the factors (PEFT's convention). For GPT-2 Conv1D W is taken as (out, in) like every kind;
    PEFT 0.21.2 decomposes the stored (in, out) weight there and its forward then fails on shapes.

    Raises:
        ValueError: r > min(out, in), or a convolution target.
    """
    if request.embedding:
        return _embedding_fallback(request, "olora")
    W = _matrix(request, "olora")
    Q, R = torch.linalg.qr(W)
    B, A = Q[:, : request.r].contiguous(), R[: request.r].contiguous()
    return InitResult(A=A, B=B, base_weight=W - request.scaling * B @ A)


@register_init("loftq", needs_weight=True, residual=True, repeatable=False)
def loftq(request: InitRequest) -> InitResult:
    """LoftQ (arXiv:2310.08659, Algorithm 1): a quantised base plus the adapter that best repairs it.

    Start with T = W; repeat ``iters`` times (options {"bits": 4|8, "iters": N}):
        Q = deq(quantize(T))   (NF4 blocks of 64, or int8 rows; nf4.py),
        U S Vᵀ = svd(W − Q),   B = U_r √(S_r/s),  A = √(S_r/s) V_rᵀ,   T = W − s·B A.
    base_weight = Q (out, in), kept as float values: the layer does not re-quantise the base.
    After the first step ‖W − (Q + s·B A)‖ < ‖W − deq(quantize(W))‖ unless W − Q is already 0.
    PEFT puts no 1/s in the factors (peft issue #1982), so only at s = 1 does it make s·B A fit W − Q;
    lorakit fits for every s, and equals PEFT at s = 1.

    Raises:
        ValueError: an Embedding or convolution target (PEFT fails on both), r > min(out, in), bits not 4 or 8.
    """
    if request.embedding:
        raise ValueError(explain("init_lora_weights='loftq' is not supported", where="an Embedding target",
                                 expected="Linear or Conv1D (GPT-2) targets", fix="exclude the embedding"))
    W = _matrix(request, "loftq")
    target = W
    for _ in range(request.options.get("iters", 1)):
        quantized = fake_quantize(target, request.options.get("bits", 4))
        U, S, Vh = torch.linalg.svd(W - quantized, full_matrices=False)
        A, B = split_svd(U, S, Vh, request.r, request.scaling)
        target = W - request.scaling * B @ A
    return InitResult(A=A.contiguous(), B=B.contiguous(), base_weight=quantized)


# ---- data-driven inits (calibrate.py, corda.py) -------------------------------------------------------------------------
@register_init("eva", data_driven=True, repeatable=False)
def eva(request: InitRequest) -> InitResult:
    """EVA before calibration (PEFT's "eva"): A as LoRA's default (kaiming-uniform), B = 0, so B A = 0.

    ``calibrate.initialize_lora_eva_weights`` then replaces A with the principal components of the layer
    inputs and changes the rank. Embedding and convolution targets, which EVA does not calibrate, keep
    LoRA's default init (PEFT does the same).
    """
    return default(request)


@register_init("corda", needs_weight=True, attached={"eigens": "eigens"}, residual=True, exact=True,
               data_driven=True, repeatable=False)
def corda(request: InitRequest) -> InitResult:
    """CorDA (arXiv:2406.05223), PEFT's "corda": the covariance-oriented SVD W = U S Vᵀ becomes the adapter.

    ``corda.preprocess_corda`` computed W C' = U S Vhᵀ with C' the damped input covariance, V = (Vh C'⁻¹)ᵀ,
    and kept r triplets (the largest for "ipm", the smallest for "kpm"); the layer passes them as
    options["eigens"] (S (r,), U (out, r), V (in, r)). As in PiSSA, 1/s sits under the root:
    B = U √(S/s)  (out, r),  A = √(S/s) Vᵀ  (r, in),  W_res = W − s·B A, so W_res + s·B A == W.

    Raises:
        ValueError: preprocess_corda was not run on this layer, its triplets do not fit the layer or r, they
            hold NaN/inf, or the target is a convolution (PEFT decomposes Linear / Conv1D only).
    """
    if request.embedding:
        return _embedding_fallback(request, "corda")
    W = _matrix(request, "corda")
    eigens = request.options.get("eigens")
    if eigens is None:
        raise ValueError(explain("init_lora_weights='corda' found no CorDA decomposition",
                                 where=f"a {_layer_name(request)} target",
                                 fix="run lorakit.preprocess_corda(model, lora_config, run_model=...) on the plain "
                                     "model before get_peft_model, with the same lora_config"))
    S, U, V = (t.detach().float().to(W.device) for t in (eigens.S_WC, eigens.U_WC, eigens.V_WC))
    expected = ((request.r,), (W.shape[0], request.r), (W.shape[1], request.r))
    if (tuple(S.shape), tuple(U.shape), tuple(V.shape)) != expected:
        raise ValueError(explain("the CorDA decomposition does not fit this layer", where=_layer_name(request),
                                 got=f"S {tuple(S.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)}",
                                 expected=f"S {expected[0]}, U {expected[1]}, V {expected[2]}",
                                 fix="run preprocess_corda with the same model and lora_config (and a cache_file "
                                     "built for them)"))
    if not all(torch.isfinite(t).all() for t in (S, U, V)):
        raise ValueError(explain("the CorDA decomposition holds NaN or inf", where=_layer_name(request),
                                 fix="check the calibration data that run_model feeds"))
    A, B = (factor.contiguous() for factor in split_svd(U, S, V.T, request.r, request.scaling))
    return InitResult(A=A, B=B, base_weight=W - request.scaling * B @ A)
