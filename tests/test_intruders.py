"""reduce_intruder_dimension (issue 15, item 5): against peft 0.21.2 on Linear layers, and against the paper's
formula (written out below with plain torch) on every 2-D kind, including GPT-2's Conv1D and Embedding where
peft 0.21.2 writes factors of the wrong orientation.
"""

from __future__ import annotations

import io
from types import ModuleType

import peft
import peft.tuners.lora.intruders
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.intruders import reduce_intruder_dimension

REDUCE = {peft: peft.tuners.lora.intruders.reduce_intruder_dimension, lorakit: reduce_intruder_dimension}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 10)
        self.lin0 = nn.Linear(10, 12)
        self.conv = Conv1D(9, 12)  # GPT-2's layer: weight (in=12, out=9)
        self.lin1 = nn.Linear(9, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.conv(torch.relu(self.lin0(self.emb(ids))))))


def net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def trained(lib: ModuleType, targets: list[str], r: int = 3) -> nn.Module:
    """An adapter with large random factors, so that W + ΔW has directions W lacks (intruders)."""
    model = lib.get_peft_model(net(), lib.LoraConfig(target_modules=targets, r=r, lora_alpha=6))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(2 * torch.randn(param.shape, generator=generator))
    return model


IDS = torch.tensor([[0, 3, 5, 11], [2, 7, 1, 4]])


def reference(W: torch.Tensor, delta: torch.Tensor, s: float, r: int, top_k: int, eps: float, lam: float):
    """The paper's recipe on W as stored: returns s·(new ΔW) in W's layout, or None without intruders."""
    U0 = torch.linalg.svd(W)[0]
    U, S, Vh = torch.linalg.svd(W + delta, full_matrices=False)
    cos = torch.stack([max(abs(torch.dot(U[:, i], U0[:, j])) for j in range(U0.shape[1])) for i in range(len(S))])
    found = [i for i in range(min(top_k, len(S))) if cos[i] < eps]
    if not found:
        return None
    mitigated = W + delta + sum((lam - 1) * S[i] * torch.outer(U[:, i], Vh[i]) for i in found) - W
    U2, S2, Vh2 = torch.linalg.svd(mitigated, full_matrices=False)
    return (U2[:, :r] * S2[:r]) @ Vh2[:r]  # the best rank-r approximation


@pytest.mark.parametrize("threshold_epsilon, mitigation_lambda", [(999.0, 0.75), (999.0, 0.2), (0.0, 0.75),
                                                                  (0.5, 0.75)])
def test_linear_as_peft(threshold_epsilon: float, mitigation_lambda: float) -> None:
    results = {}
    for lib in (peft, lorakit):
        model = trained(lib, ["lin0", "lin1"])
        sink = io.StringIO()
        REDUCE[lib](model, threshold_epsilon=threshold_epsilon, mitigation_lambda=mitigation_lambda,
                    logging_sink=lambda *args: print(*args, file=sink))
        layers = [model.base_model.model.lin0, model.base_model.model.lin1]
        deltas = [layer.get_delta_weight("intruder_reduced").float() for layer in layers]
        with torch.no_grad():
            results[lib] = sink.getvalue(), deltas, model(IDS), model.active_adapters, sorted(model.peft_config)
    (log, deltas, out, active, names), (peft_log, peft_deltas, peft_out, peft_active, peft_names) = \
        results[lorakit], results[peft]
    assert (log, active, names) == (peft_log, peft_active, peft_names)
    assert "Intruders" in log or threshold_epsilon == 0.0
    for got, want in zip(deltas, peft_deltas):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, peft_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["emb", "lin0", "conv"])
@pytest.mark.parametrize("mitigation_lambda", [0.75, 1.0])
def test_every_kind_matches_the_formula(target: str, mitigation_lambda: float) -> None:
    model = trained(lorakit, [target])
    layer = model.base_model.model.get_submodule(target)
    W = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    s, r = layer.scaling["default"], layer.r["default"]
    reduce_intruder_dimension(model, threshold_epsilon=999.0, mitigation_lambda=mitigation_lambda, logging_sink=None)
    want = reference(W, delta, s, r, 10, 999.0, mitigation_lambda)
    torch.testing.assert_close(layer.get_delta_weight("intruder_reduced"), want, rtol=1e-4, atol=1e-4)
    if mitigation_lambda == 1.0:  # nothing removed: the same update (ΔW has rank r, the truncation is exact)
        torch.testing.assert_close(layer.get_delta_weight("intruder_reduced"), delta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=0, atol=0)  # the old one is kept


def test_no_intruders_copies_the_adapter() -> None:
    model = trained(lorakit, ["lin0", "conv", "emb"])
    lines: list[str] = []
    reduce_intruder_dimension(model, threshold_epsilon=0.0, logging_sink=lines.append)
    assert lines == ["base_model.model.emb: No intruders", "base_model.model.lin0: No intruders",
                     "base_model.model.conv: No intruders", "Enabling new adapter intruder_reduced"]
    for module in (model.base_model.model.lin0, model.base_model.model.conv, model.base_model.model.emb):
        torch.testing.assert_close(module.get_delta_weight("intruder_reduced"), module.get_delta_weight("default"),
                                   rtol=0, atol=0)


def test_refusals() -> None:
    dora = lorakit.get_peft_model(net(), lorakit.LoraConfig(target_modules=["lin0"], use_dora=True))
    with pytest.raises(NotImplementedError, match="base_model.model.lin0 cannot be processed"):
        reduce_intruder_dimension(dora, logging_sink=None)
    assert list(dora.peft_config) == ["default"]  # refused before the new adapter was added
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        reduce_intruder_dimension(trained(lorakit, ["lin0"]), old_adapter_name="nope")
    with pytest.raises(ValueError, match="The provided model is not using LoRA"):
        reduce_intruder_dimension(net())
