"""torch.compile sees through lorakit: no graph break, and compiled runs equal to eager runs and to PEFT.

The table is {plain LoRA, DoRA} x {train, eval} x {dropout 0, 0.1}; each case holds one base layer of
every kind (``BASES``; MultiheadAttention has no DoRA, in PEFT as in lorakit) side by side, compiles them with ``fullgraph=True``
(any graph break raises, so passing means TorchDynamo's graph_break_count is 0) on the ``aot_eager``
backend (AOTAutograd's traced forward and backward, run op by op: the graphs inductor would get, at test
speed), and runs eager and compiled from the same seed. Outputs and the gradients of the input and of
every trainable tensor must agree within float32 rounding (the compiled plain-LoRA formula adds y and
c·h Bᵀ in two ops where eager's addmm_ adds them in one: an ulp of the output). Dropout masks are equal,
not just equal in law: the compiled graph draws through ``torch.ops.lorakit.keep_mask``, the eager op's
own draw. Where PEFT computes the same thing (dropout 0 or eval; not MultiheadAttention, whose out_proj
update PEFT 0.21.2 applies twice, see kinds_mha.py), the compiled output also equals PEFT's eager output.

``test_llama_has_no_graph_break`` is the issue's measurement (``torch._dynamo.explain`` on a 2-layer Llama,
all-linear LoRA, dropout 0.1, training); the last tests cover lorakit.compiling's regional compilation.
"""

from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.compiling import compile_blocks, repeated_blocks
from models import tiny_llama

BASES = {  # kind -> (factory, input shape, or None for token ids)
    "linear": (lambda: nn.Linear(12, 10), (2, 5, 12)),
    "linear_twin": (lambda: nn.Linear(12, 7), (2, 5, 12)),  # reads linear's x, as q, k and v read one tensor
    "conv1d_gpt2": (lambda: Conv1D(10, 12), (2, 5, 12)),  # weight (in, out)
    "embedding": (lambda: nn.Embedding(20, 10), None),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), (2, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3), (2, 3, 4, 4, 4)),
    "mha": (lambda: nn.MultiheadAttention(12, 2, batch_first=True), (2, 5, 12)),
}
VARIANTS = {"plain": {}, "dora": {"use_dora": True}}
SHARED = {"linear_twin": "linear"}  # kind -> the kind whose input it reads (its mask must still be its own)
NO_DORA = {"mha"}  # PEFT refuses DoRA on nn.MultiheadAttention, and so does lorakit
CASES = list(itertools.product(VARIANTS, ("train", "eval"), (0.0, 0.1)))
TOL = dict(atol=2e-5, rtol=2e-5)  # float32: a few ulps of values of order 1


class Net(nn.Module):
    """One base layer of each kind side by side (one compile per case covers every kind); out[kind] = layer(x)."""

    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({kind: BASES[kind][0]() for kind in kinds})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        for kind, layer in self.layers.items():
            x = inputs[SHARED.get(kind, kind)]
            outputs[kind] = layer(x, x, x)[0] if kind == "mha" else layer(x)
        return outputs


def _build(library, variant: str, mode: str, p: float) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Net([kind for kind in BASES if not (variant == "dora" and kind in NO_DORA)])
        config = library.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=list(net.layers),
                                    **VARIANTS[variant])
        model = library.get_peft_model(net, config)
        torch.manual_seed(1)
        with torch.no_grad():  # B non-zero (the branch is not a no-op), m ≠ ‖W + s·B A‖ for DoRA
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.normal_(0, 0.5)
                if "lora_magnitude_vector" in name:
                    param.mul_(1.5)
    return model.train(mode == "train")


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    inputs = {}
    for kind in model.base_model.model.layers:
        if kind in SHARED:
            continue
        shape = BASES[kind][1]
        inputs[kind] = (torch.randint(0, 20, (2, 5), generator=generator) if shape is None
                        else torch.randn(shape, generator=generator))
    return inputs


def _plain(name: str) -> str:
    """A parameter's name without the compiled module's and PeftModel's prefixes."""
    return name.replace("_orig_mod.", "").replace("base_model.model.", "")


def _run(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """Outputs, input gradients and the gradient of every trainable tensor for loss = Σ w ⊙ out, from ``seed``."""
    model.zero_grad(set_to_none=True)
    inputs = {kind: x.detach().requires_grad_(x.is_floating_point()) for kind, x in inputs.items()}
    torch.manual_seed(seed)
    outputs = model(inputs)
    generator = torch.Generator().manual_seed(4)
    sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs.values()).backward()
    result = {f"out {kind}": out.detach() for kind, out in outputs.items()}
    result.update({f"grad x {kind}": x.grad for kind, x in inputs.items() if x.is_floating_point()})
    result.update({_plain(name): p.grad for name, p in model.named_parameters() if p.requires_grad})
    return result


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each case compiles new modules: no cache entries or recompile counts carried over
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant,mode,p", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_compiled_equals_eager_and_peft(variant: str, mode: str, p: float) -> None:
    model = _build(lorakit, variant, mode, p)
    inputs = _inputs(model)
    eager = _run(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    _run(compiled, inputs, seed=5)  # compiles; another seed, so a mask kept from this call would show
    result = _run(compiled, inputs)
    kinds = list(inputs)
    assert result.keys() == eager.keys()
    assert all(f"{kind}.lora_{factor}.default.weight" in "".join(result) or kind == "embedding"
               for kind in kinds for factor in "AB")  # every layer's factors got gradients
    for name in eager:
        torch.testing.assert_close(result[name], eager[name], **TOL, msg=lambda m: f"{name}: {m}")
    if p > 0 and mode == "train":  # the dropout is really active: another seed, other outputs
        again = _run(compiled, inputs, seed=6)
        for kind in kinds:
            if kind not in ("embedding", "mha"):  # PEFT applies no dropout to these two
                assert not torch.equal(again[f"out {kind}"], result[f"out {kind}"]), kind
    if p == 0 or mode == "eval":  # PEFT computes the same function (not for MHA: kinds_mha.py, peft#3774)
        twin = _build(peft, variant, mode, p)
        twin.load_state_dict(model.state_dict())  # lorakit's keys are PEFT's, key for key
        reference = _run(twin, inputs)
        assert reference.keys() == result.keys()
        for name, value in result.items():
            if "mha" not in name:
                torch.testing.assert_close(value, reference[name], **TOL, msg=lambda m: f"{name} vs peft: {m}")


@pytest.mark.parametrize("library", [lorakit, peft], ids=["lorakit", "peft"])
def test_llama_has_no_graph_break(library) -> None:
    """The issue's count: 2-layer Llama, all-linear, dropout 0.1, training (42 breaks before, PEFT 0)."""
    model = library.get_peft_model(tiny_llama(0), library.LoraConfig(r=4, target_modules="all-linear",
                                                                    lora_dropout=0.1)).train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compile_blocks_compiles_one_block_once_and_trains_as_eager() -> None:
    """Regional compilation: the decoder layers share compiled graphs (no recompile per layer); a training
    step with dropout 0.1 gives eager's loss and gradients (same seed, same masks)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # global: graphs compiled by earlier tests in this process count too
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    eager = lorakit.get_peft_model(tiny_llama(0), config).train()
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled, backend="aot_eager", fullgraph=True)
    counters.clear()  # torch._dynamo.reset() leaves the counters of earlier tests
    assert blocks == list(compiled.base_model.model.model.layers) and len(blocks) == 2
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, compiled):
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {_plain(n): p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **TOL, msg=lambda m: f"{name}: {m}")
    # two graphs, not one per layer: layer 0's input (the frozen embedding's output) needs no gradient, the
    # input of layers 1 … L − 1 does (a guard on requires_grad); with 2 layers this also proves layer 1 ≠ layer 0
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_blocks_refuses_a_model_without_repeated_blocks() -> None:
    assert repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []
    with pytest.raises(ValueError, match="no repeated blocks to compile.*torch.compile\\(model\\)"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))
