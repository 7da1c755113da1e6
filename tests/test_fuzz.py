"""Fuzzing (hypothesis): every input ends in success with a working model, or a ValueError / NotImplementedError
(lorakit's errors are ValueErrors) with a message; never another exception, a hang or a changed model.

Bounded in CI (profile "ci", ~20 s); the long run is
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py`` (add ``--hypothesis-show-statistics`` for the
example counts the README quotes).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from models import build, example_inputs
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layer import LoraLayer

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def budget(examples: int) -> int:
    """Examples per test: ``examples`` in CI, 25 times more in the long run."""
    return examples * (25 if PROFILE == "long" else 1)

HANG_SECONDS = 30  # one example taking this long is a hang
EXPECTED = (ValueError, NotImplementedError)  # AdapterLoadError, UnknownArgumentError are ValueErrors


@contextlib.contextmanager
def deadline(seconds: float = HANG_SECONDS):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts the example after ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"example ran longer than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), f"module tree changed: {sorted(set(after) ^ set(before))[:5]}"
    assert all(torch.equal(after[k], before[k]) for k in before), "a tensor changed"


TALLY: collections.Counter = collections.Counter()  # (what, "ok" / error type): printed with -s


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    yield
    print("\nfuzz outcomes:", dict(sorted(TALLY.items())))


def outcome(call, what: str = "call"):
    """(result, None) or (None, expected error); anything else propagates and fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with deadline():
                result = call()
            TALLY[what, "ok"] += 1
            return result, None
        except EXPECTED as error:
            assert str(error).strip(), f"{type(error).__name__} without a message"
            TALLY[what, type(error).__name__] += 1
            return None, error


# ---- LoraConfig arguments -------------------------------------------------------------------------------------
NAMES = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens",
         "lin1", "lin2", "conv", "emb", "nothing_here", "", ".*", "layers.0.self_attn.q_proj", "mlp"]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=6),
                 st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
VALID = {  # plausible values (mostly accepted): half the examples draw only from these
    "r": st.integers(1, 8),
    "lora_alpha": st.one_of(st.integers(1, 32), st.floats(0.5, 32)),
    "lora_dropout": st.floats(0, 0.5),
    "target_modules": st.one_of(st.lists(st.sampled_from(NAMES[:12]), min_size=1, max_size=4),
                                st.sampled_from(["all-linear", ".*proj", "lin1"])),
    "exclude_modules": st.one_of(st.none(), st.lists(st.sampled_from(NAMES[:12]), max_size=2)),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal"]),
    "use_rslora": st.booleans(),
    "use_dora": st.booleans(),
    "fan_in_fan_out": st.booleans(),
    "layers_to_transform": st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, max_size=2)),
    "rank_pattern": st.dictionaries(st.sampled_from(NAMES[:12]), st.integers(1, 8), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(NAMES[:12]), st.integers(1, 8), max_size=2),
    "modules_to_save": st.one_of(st.none(), st.lists(st.sampled_from(NAMES[:12]), max_size=2)),
    "inference_mode": st.booleans(),
    "task_type": st.sampled_from([None, "CAUSAL_LM", "FEATURE_EXTRACTION"]),
    "ensure_weight_tying": st.booleans(),
}
ODD = {  # out-of-range and wrongly typed values, plus a misspelt argument
    "r": st.integers(-2, 0), "lora_alpha": st.integers(-4, 0), "lora_dropout": st.floats(-0.5, 1.5),
    "target_modules": st.sampled_from(NAMES + ["["]), "exclude_modules": st.sampled_from(NAMES),
    "init_lora_weights": st.sampled_from(["loftq", "eva", "corda", "bogus"]), "rnak": JUNK,
}
FIELDS = {name: st.one_of(VALID.get(name, JUNK), ODD.get(name, JUNK), JUNK) for name in {*VALID, *ODD}}


def _args(table: dict) -> st.SearchStrategy:
    keys = st.dictionaries(st.sampled_from(sorted(table)), st.none(), max_size=6)
    return keys.flatmap(lambda chosen: st.fixed_dictionaries({k: table[k] for k in chosen}))


CONFIG_ARGS = st.one_of(_args(VALID), _args(FIELDS))


def working(model: nn.Module, inputs: dict) -> None:
    """A model that runs: same output shape as the base, finite where the base is."""
    with torch.no_grad():
        out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    assert torch.isfinite(out).all()


@given(args=CONFIG_ARGS, model_name=st.sampled_from(["llama", "mlp"]))
@settings(max_examples=budget(80))
@example(args={"task_type": []}, model_name="llama")  # found: TypeError (unhashable) from the task_type check
@example(args={"modules_to_save": False}, model_name="llama")  # found: TypeError ('bool' is not iterable)
def test_fuzz_lora_config_and_injection(args, model_name):
    config, error = outcome(lambda: LoraConfig(**args), "LoraConfig")
    if error is not None:
        return
    model = build(model_name)
    before = snapshot(model)
    peft_model, error = outcome(lambda: get_peft_model(model, config), "get_peft_model")
    if error is not None:
        assert not any(isinstance(m, LoraLayer) for m in model.modules()), "a failed get_peft_model left LoRA layers"
        assert_unchanged(model, before)
        return
    working(peft_model, example_inputs(model_name))


# ---- small module trees -------------------------------------------------------------------------------------
class Block(nn.Module):
    """Named Linear layers applied in order (names drawn from NAMES, so targets sometimes match)."""

    def __init__(self, names: list[str], sizes: list[int]) -> None:
        super().__init__()
        self.order = names
        for name, (d_in, d_out) in zip(names, zip(sizes, sizes[1:])):
            self.add_module(name, nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = torch.tanh(getattr(self, name)(x))
        return x


class Tree(nn.Module):
    def __init__(self, blocks: list[tuple[list[str], list[int]]], vocab: int | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, blocks[0][1][0]) if vocab else None
        self.layers = nn.ModuleList(Block(names, sizes) for names, sizes in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        for block in self.layers:
            x = block(x)
        return x


LAYER_NAMES = ["q_proj", "v_proj", "fc", "dense", "out", "k_proj"]


@st.composite
def trees(draw):
    width = draw(st.integers(1, 6))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        names = draw(st.lists(st.sampled_from(LAYER_NAMES), min_size=1, max_size=3, unique=True))
        sizes = [width] + [draw(st.integers(1, 6)) for _ in names]
        width = sizes[-1]
        blocks.append((names, sizes))
    vocab = draw(st.one_of(st.none(), st.integers(2, 9)))
    return blocks, vocab


@given(shape=trees(), targets=st.one_of(st.lists(st.sampled_from(LAYER_NAMES + ["embed_tokens", "layers"]),
                                                 min_size=1, max_size=3), st.just("all-linear"),
                                        st.sampled_from([r".*\.q_proj", r"layers\.0\..*", "fc"])),
       r=st.integers(1, 8), dora=st.booleans(), init=st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
       seed=st.integers(0, 3))
@settings(max_examples=budget(80))
# found: a failed PiSSA injection left LoraLayer wrappers (and rewritten weights) behind
@example(shape=([(["q_proj"], [1, 1])], None), targets=r".*\.q_proj", r=2, dora=False, init="pissa", seed=0)
@example(shape=([(["q_proj", "fc"], [4, 4, 1])], None), targets="all-linear", r=2, dora=False, init="pissa", seed=0)
def test_fuzz_module_trees(shape, targets, r, dora, init, seed):
    blocks, vocab = shape
    torch.manual_seed(seed)
    model = Tree(blocks, vocab).eval()
    x = torch.randint(0, vocab, (2, 3)) if vocab else torch.randn(2, blocks[0][1][0])
    with torch.no_grad():
        reference = model(x)
    before = snapshot(model)
    config = LoraConfig(target_modules=targets, r=r, use_dora=dora, init_lora_weights=init)
    peft_model, error = outcome(lambda: get_peft_model(model, config), "tree get_peft_model")
    if error is not None:
        assert_unchanged(model, before)
        return
    with torch.no_grad():
        out = peft_model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    if init is True:  # B = 0 (A = 0 for embeddings): the adapter starts as the identity on outputs
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        again = Tree(blocks, vocab).eval()
        again.load_state_dict(before)
        loaded, error = outcome(lambda: PeftModel.from_pretrained(again, folder), "tree reload")
        assert error is None, error
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), out, atol=1e-5, rtol=1e-5)


# ---- adapter files ------------------------------------------------------------------------------------------
LLAMA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "good"
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _header(raw: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# Each mutation: (draw) -> (folder) -> None. Raw-byte mutations first, then tensor-level, then config-level.
def m_random_bytes(draw):
    data = draw(st.binary(max_size=256))
    return lambda folder: (folder / WEIGHTS).write_bytes(data)


def m_truncate(draw):
    fraction = draw(st.floats(0, 1, exclude_max=True))
    return lambda folder: (folder / WEIGHTS).write_bytes((raw := (folder / WEIGHTS).read_bytes())[:int(len(raw) * fraction)])


def m_header_length(draw):
    length = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**60, 2**63, 2**64 - 1, 0, 1, 7])))
    return lambda folder: (folder / WEIGHTS).write_bytes(struct.pack("<Q", length) + (folder / WEIGHTS).read_bytes()[8:])


def m_header_field(draw):
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "XX", ""]),
                  "shape": st.lists(st.integers(-1, 70), max_size=3),
                  "data_offsets": st.lists(st.integers(-5, 10**9), min_size=0, max_size=3)}[field])
    which = draw(st.integers(0, 3))

    def mutate(folder):
        header, data = _header((folder / WEIGHTS).read_bytes())
        key = sorted(k for k in header if k != "__metadata__")[which]
        header[key][field] = value
        (folder / WEIGHTS).write_bytes(_with_header(header, data))
    return mutate


def m_tensors(draw):
    how = draw(st.sampled_from(["int", "float64", "float16", "bool", "nan", "inf", "rename", "drop", "add",
                                "reshape", "empty", "scalar"]))
    which = draw(st.integers(0, 3))
    junk_key = draw(st.sampled_from(["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                                     "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
                                     "base_model.model.nope.lora_B.weight", "x", "base_model.model.lm_head.weight"]))

    def mutate(folder):
        tensors = load_file(folder / WEIGHTS)
        key = sorted(tensors)[which]
        value = tensors[key]
        changes = {
            "int": lambda: {**tensors, key: value.to(torch.int32)},
            "float64": lambda: {**tensors, key: value.double()},
            "float16": lambda: {**tensors, key: value.half()},
            "bool": lambda: {**tensors, key: value > 0},
            "nan": lambda: {**tensors, key: value.fill_(math.nan)},
            "inf": lambda: {**tensors, key: value.fill_(math.inf)},
            "rename": lambda: {**{k: v for k, v in tensors.items() if k != key}, junk_key: value},
            "drop": lambda: {k: v for k, v in tensors.items() if k != key},
            "add": lambda: {**tensors, junk_key: torch.ones(4, 32)},
            "reshape": lambda: {**tensors, key: value.reshape(value.shape[::-1]).contiguous()},
            "empty": lambda: {**tensors, key: value[:0].contiguous()},
            "scalar": lambda: {**tensors, key: torch.tensor(1.0)},
        }
        save_file(changes[how](), str(folder / WEIGHTS), metadata={"format": "pt"})
    return mutate


def m_config(draw):
    field = draw(st.sampled_from(sorted(FIELDS) + ["peft_type", "base_model_name_or_path", "lora_bias"]))
    value = draw(st.one_of(FIELDS.get(field, JUNK), JUNK))

    def mutate(folder):
        data = json.loads((folder / CONFIG).read_text())
        data[field] = value
        (folder / CONFIG).write_text(json.dumps(data, allow_nan=True))
    return mutate


MUTATIONS = [m_random_bytes, m_truncate, m_header_length, m_header_field, m_tensors, m_config]


@st.composite
def broken_folders(draw):
    return [draw(st.sampled_from(MUTATIONS))(draw) for _ in range(draw(st.integers(1, 2)))]


@given(mutations=broken_folders(), into_existing=st.booleans())
@settings(max_examples=budget(150))
def test_fuzz_adapter_files(good, mutations, into_existing):
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        shutil.copytree(good, folder)
        for mutate in mutations:
            try:
                mutate(folder)
            except Exception:  # noqa: BLE001
                assume(False)  # the mutation itself did not apply (e.g. the file is already random bytes)
        if into_existing:
            model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
            before = snapshot(model)
            _, error = outcome(lambda: model.load_adapter(folder, "other"), "file load_adapter")
            loaded = model if error is None else None
        else:
            model = build("llama")
            before = snapshot(model)
            loaded, error = outcome(lambda: PeftModel.from_pretrained(model, folder), "file from_pretrained")
        if error is not None:
            if into_existing:
                assert list(model.peft_config) == ["default"]
            else:
                assert not any(isinstance(m, LoraLayer) for m in model.modules())
            assert_unchanged(model, before)
            return
        inputs = example_inputs("llama")
        with torch.no_grad():
            out = loaded(**inputs).logits
        assert out.shape == (2, 8, 128)


# ---- regressions the fuzzer found, pinned as plain tests ------------------------------------------------------
@pytest.mark.parametrize("edit", [{"layers_to_transform": [0], "layers_pattern": "layers"},
                                  {"modules_to_save": ["q_proj"]}], ids=["layers_to_transform", "modules_to_save"])
@pytest.mark.parametrize("into_existing", [True, False], ids=["load_adapter", "from_pretrained"])
def test_keys_the_config_does_not_plan_are_unexpected(good, tmp_path, edit, into_existing):
    """A file key that decodes to a tensor this adapter's config does not plan (a LoRA layer of another adapter,
    or a modules_to_save copy of a LoRA target) raised KeyError from the load check (then io.validate); it is
    now one of the unexpected keys in the aggregated error."""
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    data = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**data, **edit}))
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA)) if into_existing else build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"problem\(s\)[\s\S]*unexpected key .*layers\.[01]\.self_attn\.q_proj"):
        model.load_adapter(folder, "other") if into_existing else PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
