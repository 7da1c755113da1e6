"""The models, the libraries applied to them, and one timed workload per kind of benchmark row.

Every workload returns ``{name: run}`` where ``run()`` does one measured repetition and returns its
duration in seconds (so untimed setup, e.g. building a fresh base model, stays outside the number).
``timing.interleave`` runs them A B C A B C ... after warm-up.

Libraries: "peft" and "lorakit" apply the same LoraConfig arguments; "floor" is the frozen base with no
adapters and backward through the frozen network to the input (what any adapter costs at least); "full"
trains every parameter (full fine-tuning); "alloc" / "safetensors" are the plain-torch references of the
injection and save + load rows.
"""

from __future__ import annotations

import copy
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Run = Callable[[], float]


# ---- models ------------------------------------------------------------------------------------------------
def build_base(seed: int = 0) -> nn.Module:
    """The issue's Llama-style model: hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192.

    8,192·512 (embeddings) + 8,192·512 (untied lm_head) + 8 · (4·512² + 3·512·1,376) + norms = 33.69 M
    parameters (the issue's targets paragraph says "~45 M"; 33.7 M is what this configuration has).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def build_smollm(seed: int = 0) -> nn.Module:
    """SmolLM2-135M-Instruct in fp32, from the copy lorakit.app.embedded converts once from the PyPI package."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from lorakit.app.embedded import default_model_folder

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(default_model_folder(verbose=False), dtype=torch.float32)


MODELS: dict[str, Callable[[], nn.Module]] = {"llama": build_base, "smollm": build_smollm}


@functools.cache
def template(model: str) -> nn.Module:
    """One built copy per model; workloads deep-copy it (building the Llama model from scratch takes ~2 s)."""
    return MODELS[model]()


def fresh(model: str) -> nn.Module:
    return copy.deepcopy(template(model))


def apply(base: nn.Module, library: str, lora: dict | None) -> nn.Module:
    """``base`` prepared for ``library`` (see the module docstring); LoRA B is set non-zero, equal in both."""
    if library in ("floor", "full"):
        base.requires_grad_(library == "full")
        if library == "floor":
            base.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return base
    module = __import__(library)
    model = module.get_peft_model(base, module.LoraConfig(**lora))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, identical in both libraries (state dicts are key-for-key equal)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def input_ids(model: nn.Module, batch: tuple[int, int], seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, batch, generator=torch.Generator().manual_seed(seed))


def timed(fn: Callable[[], object]) -> Run:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


# ---- training step -----------------------------------------------------------------------------------------
def train_step(model: nn.Module, batch: tuple[int, int]) -> Callable[[], None]:
    """forward + backward + AdamW on the trainable parameters (none for the floor)."""
    ids = input_ids(model, batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def train_runs(model: str, lora: dict | None, batch: tuple[int, int], libraries: tuple[str, ...]) -> dict[str, Run]:
    return {lib: timed(train_step(apply(fresh(model), lib, lora), batch)) for lib in libraries}


# ---- inference: unmerged vs merged vs the base model ---------------------------------------------------------
def infer_runs(model: str, lora: dict, batch: tuple[int, int]) -> dict[str, Run]:
    runs = {}
    for name, library, merge in (("base", "floor", False), ("peft", "peft", False), ("lorakit", "lorakit", False),
                                 ("lorakit merged", "lorakit", True)):
        net = apply(fresh(model), library, lora)
        net = net.merge_and_unload() if merge else net
        runs[name] = timed(_forward(net.eval(), input_ids(net, batch)))
    return runs


def _forward(model: nn.Module, ids: torch.Tensor, **kwargs: object) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)

    return forward


# ---- mixed batch: 4 adapters routed per row vs one adapter for the whole batch --------------------------------
def mixed_runs(model: str, lora: dict, batch: tuple[int, int]) -> dict[str, Run]:
    runs = {}
    for library in ("peft", "lorakit"):
        net = apply(fresh(model), library, lora)
        module = __import__(library)
        for index in range(1, 4):
            net.add_adapter(f"extra{index}", module.LoraConfig(**lora))
        net.eval()
        ids = input_ids(net, batch)
        names = [["default", "extra1", "extra2", "extra3"][row % 4] for row in range(batch[0])]
        runs[f"{library} one"] = timed(_forward(net, ids))
        runs[f"{library} mixed"] = timed(_forward(net, ids, adapter_names=names))
    return runs


# ---- get_peft_model vs allocating + initialising the same factors -------------------------------------------
def inject_runs(model: str, lora: dict, batch: tuple[int, int]) -> dict[str, Run]:
    shapes = _factor_shapes(model, lora)

    def inject(library: str) -> Run:
        def run() -> float:
            base = fresh(model)
            module = __import__(library)
            config = module.LoraConfig(**lora)
            start = time.perf_counter()
            module.get_peft_model(base, config)
            return time.perf_counter() - start

        return run

    def alloc() -> float:
        fresh(model)  # the same memory churn as the other two, untimed
        start = time.perf_counter()
        for A_shape, B_shape in shapes:
            torch.nn.init.kaiming_uniform_(torch.empty(A_shape), a=5**0.5)
            torch.zeros(B_shape)
        return time.perf_counter() - start

    return {"peft": inject("peft"), "lorakit": inject("lorakit"), "alloc": alloc}


def _factor_shapes(model: str, lora: dict) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    adapted = apply(fresh(model), "lorakit", lora)
    return [(tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape))
            for m in adapted.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


# ---- save + load round trip vs safetensors' save_file + load_file of the same tensors --------------------------
def roundtrip_runs(model: str, lora: dict, batch: tuple[int, int]) -> dict[str, Run]:
    from safetensors.torch import load_file, save_file

    adapted = {lib: apply(fresh(model), lib, lora) for lib in ("peft", "lorakit")}
    tensors = {k: v.detach().contiguous() for k, v in adapted["lorakit"].state_dict().items() if "lora_" in k}
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))

    def roundtrip(library: str) -> Run:
        module = __import__(library)

        def run() -> float:
            base = fresh(model)
            folder = Path(tempfile.mkdtemp(dir=root))
            start = time.perf_counter()
            adapted[library].save_pretrained(folder)
            module.PeftModel.from_pretrained(base, folder)
            return time.perf_counter() - start

        return run

    def plain() -> float:
        fresh(model)
        path = Path(tempfile.mkdtemp(dir=root)) / "adapter.safetensors"
        start = time.perf_counter()
        save_file(tensors, str(path))
        load_file(str(path))
        return time.perf_counter() - start

    return {"peft": roundtrip("peft"), "lorakit": roundtrip("lorakit"), "safetensors": plain}


# ---- merge_and_unload ------------------------------------------------------------------------------------------
def merge_runs(model: str, lora: dict, batch: tuple[int, int]) -> dict[str, Run]:
    def merge(library: str) -> Run:
        def run() -> float:
            adapted = apply(fresh(model), library, lora)
            start = time.perf_counter()
            adapted.merge_and_unload()
            return time.perf_counter() - start

        return run

    return {"peft": merge("peft"), "lorakit": merge("lorakit")}


# ---- timing -------------------------------------------------------------------------------------------------------
def interleave(runs: dict[str, Run], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Each run ``warmup`` times, then ``repeats`` rounds of every run in turn (A B C A B C ...)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return samples


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator / denominator measured in the same round."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator], strict=True))
