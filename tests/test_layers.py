"""LoRA layer math through the public API, checked against the textbook formulas in tests/reference.py.

Each test wraps one base layer in a tiny module, calls lorakit.get_peft_model on it, reads the adapter
weights back from the LoRA layer (lora_A / lora_B / lora_embedding_A / lora_embedding_B) and compares the
whole output tensor (and gradients) with reference.py computed in float64.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LoraWarning

import reference as ref  # tests/ is on pythonpath (pyproject.toml)

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}
ADAPTER = "default"


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _floats(*shape):
    return lambda g: torch.randn(*shape, generator=g)


def _ids(n, *shape, pad=None):
    def make(g):
        ids = torch.randint(0, n, shape, generator=g)
        if pad is not None:
            ids.view(-1)[::3] = pad  # make sure the padding index occurs
        return ids

    return make


# name -> (base layer factory, input factory). Every kind of layer PEFT's LoRA supports (minus MHA).
KINDS = {
    "linear": (lambda: nn.Linear(6, 5), _floats(2, 3, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), _floats(2, 3, 6)),
    "conv1d_gpt2": (lambda: Conv1D(5, 6), _floats(2, 3, 6)),  # Conv1D(nf=out, nx=in), weight (in, out)
    "embedding": (lambda: nn.Embedding(10, 5), _ids(10, 2, 7)),
    "embedding_pad": (lambda: nn.Embedding(10, 5, padding_idx=0), _ids(10, 2, 7, pad=0)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), _floats(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), _floats(2, 3, 7, 6)),
    "conv2d_nobias": (lambda: nn.Conv2d(3, 4, 3, bias=False), _floats(2, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=1, padding=1), _floats(1, 2, 3, 4, 4)),
}
EMBEDDINGS = ("embedding", "embedding_pad")


def build(kind, dtype=torch.float32, seed=0, **cfg):
    """(peft_model, lora layer, untouched copy of the base module, input) for one kind."""
    make_layer, make_input = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = make_layer()
    with torch.no_grad():
        for p in layer.parameters():
            nn.init.uniform_(p, -0.5, 0.5, generator=g)
    net = Net(layer).to(dtype)
    base = copy.deepcopy(net)
    cfg.setdefault("fan_in_fan_out", kind == "conv1d_gpt2")
    model = get_peft_model(net, LoraConfig(target_modules=["layer"], **cfg))
    x = make_input(g)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, model.base_model.model.layer, base, x


def factors(kind, lora):
    """The adapter tensors as stored by the layer: (A, B, lora_B bias or None)."""
    if kind in EMBEDDINGS:
        return lora.lora_embedding_A[ADAPTER], lora.lora_embedding_B[ADAPTER], None
    return lora.lora_A[ADAPTER].weight, lora.lora_B[ADAPTER].weight, lora.lora_B[ADAPTER].bias


def reference(kind, lora, x, s, A=None, B=None):
    """reference.py output in float64 for the layer's current weights (A/B may be given, e.g. grad leaves)."""
    base = lora.base_layer
    a, b, bb = factors(kind, lora)
    A = a.detach().double() if A is None else A
    B = b.detach().double() if B is None else B
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    W, bias, bb = d(base.weight), d(getattr(base, "bias", None)), d(bb)
    xd = x if kind in EMBEDDINGS else x.double()
    if kind.startswith("linear"):
        return ref.lora_linear(xd, W, bias, A, B, s, bb)
    if kind == "conv1d_gpt2":
        return ref.lora_conv1d_gpt2(xd, W, bias, A, B, s, bb)
    if kind in EMBEDDINGS:
        return ref.lora_embedding(xd, W, A, B, s, base.padding_idx)
    return ref.lora_convNd(xd, W, bias, A, B, s, base.stride, base.padding, base.dilation, bb)


# (r, lora_alpha, use_rslora, lora_bias)
VARIANTS = [(1, 1, False, False), (4, 8, False, False), (4, 8, True, False), (2, 32, False, True), (8, 3, True, True)]
FORWARD_CASES = [
    pytest.param(kind, *v, id=f"{kind}-r{v[0]}-a{v[1]}-rs{int(v[2])}-lb{int(v[3])}")
    for kind in KINDS
    for v in VARIANTS
    if not (kind in EMBEDDINGS and v[3])  # lora_bias is not supported on Embedding (tested below)
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # lora_bias on a bias-free base layer warns (merge impossible)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind, r, alpha, rslora, lora_bias", FORWARD_CASES)
def test_forward_matches_reference(kind, r, alpha, rslora, lora_bias, dtype):
    model, lora, _, x = build(
        kind, dtype, r=r, lora_alpha=alpha, use_rslora=rslora, lora_bias=lora_bias, init_lora_weights=False
    )
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    expected = reference(kind, lora, x, ref.scaling(alpha, r, rslora))
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


def test_conv_dilation_matches_reference():
    # lorakit extension: PEFT 0.21.2 builds lora_A without the base dilation and crashes on a shape mismatch.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
    model = get_peft_model(Net(conv), LoraConfig(target_modules=["layer"], r=2, init_lora_weights=False))
    x = torch.randn(2, 3, 8, 8)
    lora = model.base_model.model.layer
    expected = reference("conv2d", lora, x, ref.scaling(8, 2))
    torch.testing.assert_close(model(x).double(), expected, **TOL[torch.float32])


# (r, lora_alpha, use_rslora, expected scaling): hand-computed.
SCALINGS = [(8, 16, False, 2.0), (8, 16, True, 16 / math.sqrt(8)), (4, 1, False, 0.25), (16, 8, True, 2.0), (1, 3, True, 3.0)]


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
@pytest.mark.parametrize("r, alpha, rslora, expected", SCALINGS)
def test_scaling(kind, r, alpha, rslora, expected):
    _, lora, _, _ = build(kind, r=r, lora_alpha=alpha, use_rslora=rslora)
    assert lora.r[ADAPTER] == r
    assert lora.lora_alpha[ADAPTER] == alpha
    assert lora.scaling[ADAPTER] == pytest.approx(expected, rel=1e-12)
    assert ref.scaling(alpha, r, rslora) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- dropout -----------------------------------


def _identity_adapter(kind, lora, d):
    """Set A = B = I so that the LoRA branch returns exactly its (dropped-out) input (scaling 1)."""
    with torch.no_grad():
        eye = torch.eye(d)
        if kind == "conv2d_1x1":
            eye = eye[:, :, None, None]
        lora.lora_A[ADAPTER].weight.copy_(eye)
        lora.lora_B[ADAPTER].weight.copy_(eye)


DROPOUT_KINDS = {  # kinds whose LoRA branch can be made the identity: in == out == r == 16
    "linear": (lambda: nn.Linear(16, 16), lambda: torch.randn(8, 10, 16)),
    "conv1d_gpt2": (lambda: Conv1D(16, 16), lambda: torch.randn(8, 10, 16)),
    "conv2d_1x1": (lambda: nn.Conv2d(16, 16, 1), lambda: torch.randn(2, 16, 5, 8)),
}


@pytest.mark.parametrize("p", [0.5, 0.9])
@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_dropout_only_on_lora_branch(kind, p):
    torch.manual_seed(1)
    make_layer, make_x = DROPOUT_KINDS[kind]
    net = Net(make_layer())
    base = copy.deepcopy(net)
    cfg = LoraConfig(target_modules=["layer"], r=16, lora_alpha=16, lora_dropout=p, fan_in_fan_out=kind == "conv1d_gpt2")
    model = get_peft_model(net, cfg)
    lora = model.base_model.model.layer
    _identity_adapter(kind, lora, 16)
    x = make_x().requires_grad_(True)
    model.train()
    out = model(x)
    with torch.no_grad():
        delta = out - base(x)  # base path must see the clean x: what is left is exactly dropout(x)
    mask = (delta.abs() > 1e-6).to(x.dtype)
    torch.testing.assert_close(delta, ref.dropout_input(x.detach(), mask, p), **TOL[torch.float32])
    kept = mask.mean().item()
    assert abs(kept - (1 - p)) < 0.04, f"kept fraction {kept} for p={p}"
    # gradients through the same mask equal the reference's
    g = torch.randn_like(out)
    (out * g).sum().backward()
    A = lora.lora_A[ADAPTER].weight.detach().clone().requires_grad_(True)
    B = lora.lora_B[ADAPTER].weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    W, b = base.layer.weight.detach(), base.layer.bias.detach()
    fn = {"linear": ref.lora_linear, "conv1d_gpt2": ref.lora_conv1d_gpt2, "conv2d_1x1": ref.lora_convNd}[kind]
    y = fn(xr, W, b, A, B, 1.0, mask=mask, p=p)
    (y * g).sum().backward()
    torch.testing.assert_close(lora.lora_A[ADAPTER].weight.grad, A.grad, **TOL[torch.float32])
    torch.testing.assert_close(lora.lora_B[ADAPTER].weight.grad, B.grad, **TOL[torch.float32])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])


@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_mode_has_no_dropout(kind):
    model, lora, _, x = build(kind, lora_dropout=0.9, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        out1, out2 = model(x), model(x)
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    torch.testing.assert_close(out1.double(), reference(kind, lora, x, 1.0), **TOL[torch.float32])


@pytest.mark.parametrize("kind", EMBEDDINGS)
def test_embedding_never_drops_out(kind):
    # PEFT's Embedding LoRA has no dropout on the ids path, even in training mode
    model, lora, _, x = build(kind, lora_dropout=0.9, init_lora_weights=False)
    model.train()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.double(), reference(kind, lora, x, 1.0), **TOL[torch.float32])


@pytest.mark.parametrize("p, cls", [(0.0, nn.Identity), (0.25, nn.Dropout)])
def test_dropout_module(p, cls):
    _, lora, _, _ = build("linear", lora_dropout=p)
    mod = lora.lora_dropout[ADAPTER]
    assert type(mod) is cls
    if cls is nn.Dropout:
        assert mod.p == p


# ------------------------------------------------------------------ init ------------------------------------


def _fan_in(A):
    return A[0].numel()  # in_features * prod(kernel)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_default_init_is_identity(kind, lora_bias):
    if kind in EMBEDDINGS and lora_bias:
        return  # covered by test_embedding_rejects_lora_bias
    model, lora, base, x = build(kind, r=3, lora_alpha=6, lora_bias=lora_bias)
    A, B, bb = factors(kind, lora)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), **TOL[torch.float32])
    if kind in EMBEDDINGS:
        num, dim = lora.base_layer.weight.shape
        assert A.shape == (3, num) and B.shape == (dim, 3)
        assert torch.count_nonzero(A) == 0
        assert torch.count_nonzero(B) > 0
        return
    assert torch.count_nonzero(B) == 0
    assert A.shape[0] == 3 and B.shape[:2] == (lora.base_layer.weight.shape[0 if kind != "conv1d_gpt2" else 1], 3)
    assert A.abs().max() <= ref.kaiming_uniform_bound(_fan_in(A)) + 1e-7
    assert (bb is not None) == lora_bias
    if lora_bias:
        assert torch.count_nonzero(bb) == 0


@pytest.mark.parametrize("make, fan_in", [(lambda: nn.Linear(256, 64), 256), (lambda: nn.Conv2d(16, 8, 3), 144)])
def test_kaiming_uniform_statistics(make, fan_in):
    torch.manual_seed(0)
    model = get_peft_model(Net(make()), LoraConfig(target_modules=["layer"], r=16))
    A = model.base_model.model.layer.lora_A[ADAPTER].weight.detach()
    bound = ref.kaiming_uniform_bound(fan_in)
    assert A.abs().max() <= bound + 1e-7
    assert A.abs().max() >= 0.95 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert abs(A.mean().item()) < 0.1 * bound


@pytest.mark.parametrize("make, r", [(lambda: nn.Linear(256, 64), 16), (lambda: nn.Conv2d(16, 8, 3), 8)])
def test_gaussian_init(make, r):
    torch.manual_seed(0)
    net = Net(make())
    base = copy.deepcopy(net)
    model = get_peft_model(net, LoraConfig(target_modules=["layer"], r=r, init_lora_weights="gaussian"))
    lora = model.base_model.model.layer
    A, B = lora.lora_A[ADAPTER].weight.detach(), lora.lora_B[ADAPTER].weight.detach()
    assert torch.count_nonzero(B) == 0
    assert A.std().item() == pytest.approx(1 / r, rel=0.1)
    assert abs(A.mean().item()) < 0.1 / r
    assert A.abs().max() > 2.5 / r  # a Gaussian, not a uniform bounded by ~1/sqrt(fan_in)
    x = torch.randn(4, 256) if isinstance(lora.base_layer, nn.Linear) else torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), **TOL[torch.float32])


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_embedding_default_init(init):
    torch.manual_seed(0)
    net = Net(nn.Embedding(64, 256))
    base = copy.deepcopy(net)
    model = get_peft_model(net, LoraConfig(target_modules=["layer"], r=16, init_lora_weights=init))
    lora = model.base_model.model.layer
    A, B = lora.lora_embedding_A[ADAPTER].detach(), lora.lora_embedding_B[ADAPTER].detach()
    assert A.shape == (16, 64) and B.shape == (256, 16)
    assert torch.count_nonzero(A) == 0
    assert B.std().item() == pytest.approx(1.0, rel=0.1)
    assert abs(B.mean().item()) < 0.1
    ids = torch.randint(0, 64, (3, 5))
    torch.testing.assert_close(model(ids), base(ids), atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_init_false_gives_nonzero_delta(kind):
    model, lora, base, x = build(kind, init_lora_weights=False)
    A, B, _ = factors(kind, lora)
    assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) > 0
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-3


def test_embedding_rejects_lora_bias():
    with pytest.raises(ValueError, match="lora_bias"):
        build("embedding", lora_bias=True)


# ------------------------------------------------------- trainable flags and gradients ----------------------


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.other = nn.Linear(4, 3)

    def forward(self, x):
        return self.other(self.layer(x))


P = "base_model.model."
ALWAYS = {P + "layer.lora_A.default.weight", P + "layer.lora_B.default.weight"}
BIAS_TRAINABLE = {  # bias -> trainable parameter names besides the LoRA factors
    "none": set(),
    "all": {P + "layer.base_layer.bias", P + "other.bias"},
    "lora_only": {P + "layer.base_layer.bias"},
}


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("bias", list(BIAS_TRAINABLE))
def test_bias_trainable_flags(bias, lora_bias):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayer(), LoraConfig(target_modules=["layer"], bias=bias, lora_bias=lora_bias))
    expected = ALWAYS | BIAS_TRAINABLE[bias] | ({P + "layer.lora_B.default.bias"} if lora_bias else set())
    names = {n for n, _ in model.named_parameters()}
    assert expected <= names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # a backward pass reaches exactly the trainable parameters
    model(torch.randn(5, 4)).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_match_reference(kind):
    model, lora, _, x = build(kind, r=3, lora_alpha=5, init_lora_weights=False)
    model.train()
    float_in = x.is_floating_point()
    if float_in:
        x.requires_grad_(True)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    for p in lora.base_layer.parameters():
        assert p.grad is None and not p.requires_grad
    A, B, _ = factors(kind, lora)
    Ar = A.detach().double().requires_grad_(True)
    Br = B.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True) if float_in else x
    y = reference(kind, lora, xr, ref.scaling(5, 3), A=Ar, B=Br)
    (y * g.double()).sum().backward()
    torch.testing.assert_close(A.grad.double(), Ar.grad, **TOL[torch.float32])
    torch.testing.assert_close(B.grad.double(), Br.grad, **TOL[torch.float32])
    if float_in:
        torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[torch.float32])
    if kind == "embedding_pad":
        assert torch.count_nonzero(A.grad[:, 0]) == 0  # padding_idx gets no gradient, as in F.embedding


# ------------------------------------------------------------ disable / dtypes / warnings --------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_disable_adapter_returns_base_output(kind):
    model, lora, base, x = build(kind, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            disabled = model(x)
        again = model(x)
        expected_base = base(x)
    torch.testing.assert_close(disabled, expected_base, atol=0, rtol=0)
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)
    torch.testing.assert_close(adapted.double(), reference(kind, lora, x, 1.0), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "embedding", "conv2d"])
def test_adapter_and_output_dtypes(kind, dtype):
    model, lora, base, x = build(kind, dtype, init_lora_weights=False)
    adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    A, B, _ = factors(kind, lora)
    assert A.dtype == adapter_dtype and B.dtype == adapter_dtype
    assert lora.base_layer.weight.dtype == dtype
    with torch.no_grad():
        out = model(x)
        assert out.dtype == base(x).dtype == dtype
    torch.testing.assert_close(out.double(), reference(kind, lora, x, 1.0), **TOL[dtype])


@pytest.mark.parametrize(
    "make, fan_in_fan_out", [(lambda: nn.Linear(6, 5), True), (lambda: Conv1D(5, 6), False)], ids=["linear", "conv1d_gpt2"]
)
def test_fan_in_fan_out_mismatch_warns_and_still_correct(make, fan_in_fan_out):
    torch.manual_seed(0)
    with pytest.warns(LoraWarning, match="fan_in_fan_out"):
        model = get_peft_model(
            Net(make()), LoraConfig(target_modules=["layer"], fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
        )
    lora = model.base_model.model.layer
    kind = "linear" if isinstance(lora.base_layer, nn.Linear) else "conv1d_gpt2"
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), reference(kind, lora, x, 1.0), **TOL[torch.float32])


# ------------------------------------------------------- reference.py self-consistency (for merge tests) -----


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_delta_weight_is_consistent_with_forward(kind):
    """Base weight + reference delta_weight, run without adapter, equals the reference LoRA forward."""
    _, lora, _, x = build(kind, r=3, lora_alpha=7, init_lora_weights=False)
    s = ref.scaling(7, 3)
    A, B = factors(kind, lora)[:2]
    A, B = A.detach().double(), B.detach().double()
    base = lora.base_layer
    W = base.weight.detach().double()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().double()
    lora_out = reference(kind, lora, x, s)
    if kind.startswith("linear"):
        merged = ref.lora_linear(x.double(), W + ref.delta_weight_linear(A, B, s), bias, A, B, 0.0)
    elif kind == "conv1d_gpt2":
        merged = ref.lora_conv1d_gpt2(x.double(), W + ref.delta_weight_conv1d_gpt2(A, B, s), bias, A, B, 0.0)
    elif kind in EMBEDDINGS:
        merged = ref.lora_embedding(x, W + ref.delta_weight_embedding(A, B, s), A, B, 0.0)
    else:
        Wm = W + ref.delta_weight_convNd(A, B, s)
        merged = ref.lora_convNd(x.double(), Wm, bias, A, B, 0.0, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(merged, lora_out, **TOL[torch.float64])


def test_embedding_branch_follows_embed_scale():
    """Scaled embeddings (Gemma) multiply their output by embed_scale; the LoRA update must be scaled too."""

    class ScaledEmbedding(nn.Embedding):
        def __init__(self, *args, scale: float):
            super().__init__(*args)
            self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    net = get_peft_model(Net(ScaledEmbedding(12, 6, scale=3.0)), LoraConfig(target_modules=["layer"],
                                                                           init_lora_weights=False)).eval()
    layer = net.base_model.model.layer
    ids = torch.tensor([[1, 4, 7]])
    expected = (layer.base_layer.weight + layer.get_delta_weight("default"))[ids] * 3.0
    torch.testing.assert_close(net(ids), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(net(ids), expected, atol=1e-5, rtol=1e-5)
