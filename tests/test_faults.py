"""Fault tests: every broken input ends in one clear ValueError, and nothing is lost or changed.

Each case checks two things: the error (a ValueError subclass naming what is wrong and where) and the
damage (the model's state_dict bit-identical, the folder on disk byte-identical, no stray files). The
tables below are the cases; the test functions only run them.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import build, example_inputs
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit.atomic
import lorakit.io
from lorakit import (
    AdapterLoadError,
    LoraConfig,
    LoraLayer,
    LoraWarning,
    PeftModel,
    get_peft_model,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
LLAMA_CONFIG = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}  # default targets: q_proj, v_proj


# ---- helpers --------------------------------------------------------------------------------------------------
def randomize_lora(model: nn.Module, seed: int) -> None:
    """Give every LoRA factor random values (a zero lora_B would hide a wrong load)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def outputs(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**example_inputs(name))
    return out.logits if hasattr(out, "logits") else out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The model's state_dict holds exactly the same keys, dtypes and bits as ``before``."""
    after = model.state_dict()
    assert list(after) == list(before), f"keys changed: {sorted(set(after) ^ set(before))[:5]}"
    changed = [k for k in before if after[k].dtype != before[k].dtype or not torch.equal(after[k], before[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (dotfiles included): file bytes, or None for a folder."""
    result: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            result[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            result[os.path.relpath(os.path.join(folder, name), root)] = Path(folder, name).read_bytes()
    return result


def header_length(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


def llama(hidden: int) -> LlamaForCausalLM:
    """tests/models.py's tiny llama with another hidden size (a "different base model")."""
    if hidden == 32:
        return build("llama")
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attention_dropout=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_peft(seed: int = 7) -> PeftModel:
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA_CONFIG))
    randomize_lora(model, seed)
    return model


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    """A valid tiny-llama adapter folder (random, non-zero factors); copy it before changing it."""
    folder = tmp_path_factory.mktemp("good") / "adapter"
    llama_peft(seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(good_adapter, tmp_path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    return folder


# ---- how a broken folder is loaded: onto a plain model, or into an existing PeftModel -----------------------
def load_fresh(folder: Path) -> tuple[nn.Module, dict, Callable[[], None]]:
    base = build("llama")
    return base, snapshot(base), lambda: PeftModel.from_pretrained(base, folder)


def load_into_existing(folder: Path) -> tuple[nn.Module, dict, Callable[[], None]]:
    model = llama_peft()
    return model, snapshot(model), lambda: model.load_adapter(folder, "second")


LOADERS = {"from_pretrained": load_fresh, "load_adapter": load_into_existing}


def assert_nothing_changed(model: nn.Module, before: dict) -> None:
    assert_unchanged(model, before)
    if isinstance(model, PeftModel):
        assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    else:
        assert not any(isinstance(m, LoraLayer) for m in model.modules())


# ---- corrupted files ----------------------------------------------------------------------------------------
def cut_weights(offset: Callable[[bytes, int], int]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(raw[: offset(raw, header_length(raw))])
    return mutate


def rewrite_weights(change: Callable[[bytes, int], bytes]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(change(raw, header_length(raw)))
    return mutate


def edit_config(**changes: object) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / CONFIG).read_text())
        data.update(changes)
        (folder / CONFIG).write_text(json.dumps(data))
    return mutate


def write_config(content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / CONFIG).write_bytes(content)


def bin_instead(content: Callable[[dict], object]) -> Callable[[Path], None]:
    """Replace the safetensors file by an adapter_model.bin holding ``content(tensors)``."""
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        (folder / WEIGHTS).unlink()
        torch.save(content(tensors), folder / BIN)
    return mutate


def raw_bin(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        bin_instead(lambda tensors: tensors)(folder)
        (folder / BIN).write_bytes(change((folder / BIN).read_bytes()))
    return mutate


def random_bytes(size: int) -> bytes:
    return random.Random(0).randbytes(size)


# id -> (how to break the folder, the file the error must name)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights empty": (cut_weights(lambda raw, n: 0), WEIGHTS),
    "weights cut inside header length": (cut_weights(lambda raw, n: 5), WEIGHTS),
    "weights cut after header length": (cut_weights(lambda raw, n: 8), WEIGHTS),
    "weights cut inside JSON header": (cut_weights(lambda raw, n: 8 + n // 2), WEIGHTS),
    "weights cut at last header byte": (cut_weights(lambda raw, n: 8 + n - 1), WEIGHTS),
    "weights cut after header": (cut_weights(lambda raw, n: 8 + n), WEIGHTS),
    "weights cut inside data": (cut_weights(lambda raw, n: 8 + n + (len(raw) - 8 - n) // 2), WEIGHTS),
    "weights cut last byte": (cut_weights(lambda raw, n: len(raw) - 1), WEIGHTS),
    "weights random bytes": (rewrite_weights(lambda raw, n: random_bytes(len(raw))), WEIGHTS),
    "weights header length 2**60": (rewrite_weights(lambda raw, n: (2**60).to_bytes(8, "little") + raw[8:]), WEIGHTS),
    "weights header not JSON": (rewrite_weights(lambda raw, n: raw[:8] + b"\xff" * n + raw[8 + n:]), WEIGHTS),
    "weights trailing garbage": (rewrite_weights(lambda raw, n: raw + b"garbage"), WEIGHTS),
    "weights missing": (lambda folder: (folder / WEIGHTS).unlink(), WEIGHTS),
    "weights a folder": (lambda folder: ((folder / WEIGHTS).unlink(), (folder / WEIGHTS).mkdir()), WEIGHTS),
    "config missing": (lambda folder: (folder / CONFIG).unlink(), CONFIG),
    "config empty": (write_config(b""), CONFIG),
    "config not JSON": (write_config(b"{not json"), CONFIG),
    "config not UTF-8": (write_config(b"\xff\xfe{}"), CONFIG),
    "config a list": (write_config(b"[1, 2]"), CONFIG),
    "config a string": (write_config(b'"LORA"'), CONFIG),
    "config null": (write_config(b"null"), CONFIG),
    "config peft_type IA3": (edit_config(peft_type="IA3"), CONFIG),
    "config r=-1": (edit_config(r=-1), CONFIG),
    "config target_modules=5": (edit_config(target_modules=5), CONFIG),
    "bin list of tensors": (bin_instead(lambda tensors: list(tensors.values())), BIN),
    "bin one tensor": (bin_instead(lambda tensors: next(iter(tensors.values()))), BIN),
    "bin nested dict": (bin_instead(lambda tensors: {"nested": tensors}), BIN),
    "bin dict with int keys": (bin_instead(lambda tensors: dict(enumerate(tensors.values()))), BIN),
    "bin dict of strings": (bin_instead(lambda tensors: {k: "x" for k in tensors}), BIN),
    "bin truncated": (raw_bin(lambda raw: raw[: len(raw) // 2]), BIN),
    "bin random bytes": (raw_bin(lambda raw: random_bytes(len(raw))), BIN),
}


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupted_folder_raises_and_changes_nothing(adapter, case, how):
    mutate, file_name = CORRUPTIONS[case]
    mutate(adapter)
    on_disk = tree(adapter)
    model, before, load = LOADERS[how](adapter)
    with pytest.raises(AdapterLoadError) as caught:
        load()
    message = str(caught.value)
    assert file_name in message and str(adapter) in message, message
    assert_nothing_changed(model, before)
    assert tree(adapter) == on_disk  # loading never writes


def test_corrupted_safetensors_does_not_fall_back_to_bin(adapter):
    """Both files present, safetensors broken: an error, never a silent load of the other file."""
    torch.save(load_file(adapter / WEIGHTS), adapter / BIN)
    cut_weights(lambda raw, n: 8 + n // 2)(adapter)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        PeftModel.from_pretrained(build("llama"), adapter)


# ---- pickled code ---------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("where", ["top level", "as a tensor value"])
def test_pickle_payload_is_never_run(adapter, tmp_path, how, where):
    marker = tmp_path / "pwned"
    tensors = load_file(adapter / WEIGHTS)
    (adapter / WEIGHTS).unlink()
    payload = RunsCode(marker) if where == "top level" else {**tensors, next(iter(tensors)): RunsCode(marker)}
    torch.save(payload, adapter / BIN)
    model, before, load = LOADERS[how](adapter)
    with pytest.raises(AdapterLoadError, match=BIN):
        load()
    assert not marker.exists(), "lorakit unpickled the payload"
    assert_nothing_changed(model, before)
    # the payload is live: a plain unpickle does run it (so the check above can fail)
    torch.load(adapter / BIN, weights_only=False)
    assert marker.exists()


# ---- the adapter does not fit the model -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_wrong_base_model_lists_every_mismatch(adapter, how):
    """An adapter for hidden 32 onto a llama with hidden 48: one error naming every key and both shapes."""
    model = llama(48)
    if how == "load_adapter":
        model = get_peft_model(model, LoraConfig(**LLAMA_CONFIG))
        randomize_lora(model, 3)
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as caught:
        if how == "load_adapter":
            model.load_adapter(adapter, "second")
        else:
            PeftModel.from_pretrained(model, adapter)
    message = str(caught.value)
    keys = sorted(load_file(adapter / WEIGHTS))
    assert len(keys) == 8 and f"{len(keys)} problem(s)" in message, message
    for key, tensor in load_file(adapter / WEIGHTS).items():
        # every lora_A is (4, 32) -> (4, 48); every lora_B is (out, 4) with out scaled by 48/32
        want = (4, 48) if "lora_A" in key else (tensor.shape[0] * 3 // 2, 4)
        line = next((line for line in message.splitlines() if line.strip().startswith(key + ":")), None)
        assert line is not None, f"{key} not listed:\n{message}"
        assert "x".join(map(str, tensor.shape)) in line and "x".join(map(str, want)) in line, line
    assert "this model needs" in message and str(adapter) in message
    assert_nothing_changed(model, before)


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("targets", [["nonexistent_proj"], ["c_attn", "c_proj"]])  # the second: GPT-2's names
def test_targets_missing_from_model(adapter, how, targets):
    edit_config(target_modules=targets)(adapter)
    model, before, load = LOADERS[how](adapter)
    with pytest.raises(ValueError) as caught:
        load()
    message = str(caught.value)
    assert targets[0] in message, message
    assert str(adapter) in message, f"the error does not say which adapter folder failed: {message}"
    assert_nothing_changed(model, before)


# id -> change to the tensor dict, returning (tensors, what the error must name, how many problems)
def _drop_first_a(tensors: dict) -> tuple[dict, list[str], int]:
    key = min(k for k in tensors if "lora_A" in k)
    return {k: v for k, v in tensors.items() if k != key}, [key.replace(".weight", ".default.weight")], 1


def _two_extra(tensors: dict) -> tuple[dict, list[str], int]:
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": torch.zeros(4, 32),
             "base_model.model.not_a_module.lora_A.weight": torch.zeros(4, 32)}
    return {**tensors, **extra}, sorted(extra), 2


def _missing_and_extra(tensors: dict) -> tuple[dict, list[str], int]:
    dropped, missing, _ = _drop_first_a(tensors)
    both, extra, _ = _two_extra(dropped)
    return both, missing + extra, 3


def _int_tensor(tensors: dict) -> tuple[dict, list[str], int]:
    key = min(tensors)
    return {**tensors, key: tensors[key].to(torch.int64)}, [key, "int64"], 1


def _wrong_rank(tensors: dict) -> tuple[dict, list[str], int]:
    key = min(k for k in tensors if "q_proj.lora_B" in k)
    return {**tensors, key: tensors[key][:, :2].contiguous()}, [key, "holds 32x2", "needs 32x4"], 1


KEY_FAULTS = {"missing": _drop_first_a, "unexpected": _two_extra, "missing and unexpected": _missing_and_extra,
              "integer tensor": _int_tensor, "wrong rank in one tensor": _wrong_rank}


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("fault", KEY_FAULTS)
def test_key_faults_listed_in_one_error(adapter, how, fault):
    tensors, names, count = KEY_FAULTS[fault](load_file(adapter / WEIGHTS))
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})
    model, before, load = LOADERS[how](adapter)
    with pytest.raises(AdapterLoadError) as caught:
        load()
    message = str(caught.value)
    assert f"{count} problem(s)" in message and "nothing was changed" in message and str(adapter) in message, message
    if how == "load_adapter":  # model keys name the adapter being loaded
        names = [n.replace(".default.", ".second.") for n in names]
    for name in names:
        assert name in message, f"{name} not in:\n{message}"
    assert_nothing_changed(model, before)


# ---- non-finite weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_loaded_as_stored(adapter, value):
    """Documents today's behaviour, not a policy: the load check (io.check_tensors) checks keys, shapes and
    dtypes, not values, so a NaN/inf adapter loads (as PEFT's does) and the values arrive bit for bit."""
    tensors = load_file(adapter / WEIGHTS)
    key = min(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = value
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})
    model = PeftModel.from_pretrained(build("llama"), adapter)
    loaded = model.state_dict()[key.replace(".weight", ".default.weight")]
    assert torch.equal(loaded.isnan(), tensors[key].isnan())
    assert torch.equal(torch.nan_to_num(loaded), torch.nan_to_num(tensors[key]))


# ---- interrupted saves --------------------------------------------------------------------------------------
class DiskFull(OSError):
    pass


def half_then_fail(exception: BaseException) -> Callable:
    """A writer that leaves half a file behind, then raises (a full disk, a Ctrl-C)."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)
        raise exception
    return write


def failing(exception: BaseException) -> Callable:
    def fail(*args, **kwargs):
        raise exception
    return fail


def _disk_full() -> OSError:
    return DiskFull(28, "No space left on device")


# id -> (object, attribute to replace, replacement, the exception it raises, safe_serialization)
SAVE_FAULTS = {
    "safetensors write, disk full": (lorakit.io, "save_file", half_then_fail(_disk_full()), DiskFull, True),
    "safetensors write, Ctrl-C": (lorakit.io, "save_file", half_then_fail(KeyboardInterrupt()), KeyboardInterrupt, True),
    "bin write, disk full": (torch, "save", half_then_fail(_disk_full()), DiskFull, False),
    "fsync fails": (lorakit.atomic, "_sync_tree", failing(DiskFull(5, "I/O error")), DiskFull, True),
    "swap fails": (lorakit.atomic, "_swap_in", failing(DiskFull(5, "I/O error")), DiskFull, True),
}


@pytest.mark.parametrize("existing", [True, False], ids=["over an adapter", "new folder"])
@pytest.mark.parametrize("fault", SAVE_FAULTS)
def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch, fault, existing):
    """The second save dies mid-way: the folder still holds the first adapter, whole, and no temp folder."""
    owner, attribute, replacement, error, safe = SAVE_FAULTS[fault]
    folder = tmp_path / "adapter"
    model = llama_peft(seed=1)
    if existing:
        model.save_pretrained(folder, safe_serialization=safe)
        (folder / "tokenizer.json").write_text("{}")
    expected = outputs(PeftModel.from_pretrained(build("llama"), folder), "llama") if existing else None
    on_disk = tree(tmp_path)
    randomize_lora(model, seed=2)
    monkeypatch.setattr(owner, attribute, replacement)
    with pytest.raises(error):
        model.save_pretrained(folder, safe_serialization=safe)
    monkeypatch.undo()
    assert tree(tmp_path) == on_disk, "the failed save left files behind or changed the old adapter"
    if existing:
        torch.testing.assert_close(outputs(PeftModel.from_pretrained(build("llama"), folder), "llama"), expected,
                                   atol=0, rtol=0)


def _crash_model(version: int) -> nn.Module:
    """Version 1 or 2 of a two-adapter model; the versions differ in every factor and in lora_alpha."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8 * version, target_modules=["0", "2"]))
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4 * version, target_modules=["2"]))
        torch.manual_seed(version)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_()
    return model


CRASH_INPUT = torch.linspace(-1, 1, 64).reshape(4, 16)


def _crash_outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    result = []
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            result.append(model(CRASH_INPUT))
    return tuple(result)


def _load_crash_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = PeftModel.from_pretrained(base, folder)
    model.load_adapter(folder, "other", subfolder="other")
    return _crash_outputs(model)


CHILD = """
import sys, time
import torch
from torch import nn
import lorakit.atomic, lorakit.io
from lorakit import LoraConfig, get_peft_model
from safetensors.torch import save

{source}

def slow_save_file(tensors, filename, metadata=None):  # half a file on disk for a while
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(0.01)
        handle.write(data[len(data) // 2 :])

real_sync = lorakit.atomic._sync_tree

def slow_sync(root):  # a window between the complete new folder and the swap
    time.sleep(0.005)
    real_sync(root)

lorakit.io.save_file = slow_save_file
lorakit.atomic._sync_tree = slow_sync
models = {{1: _crash_model(1), 2: _crash_model(2)}}
print("ready", flush=True)
version = 2
while True:
    models[version].save_pretrained(sys.argv[1])
    print(version, flush=True)
    version = 3 - version
"""


def test_sigkill_during_save_leaves_old_or_new_adapter(tmp_path):
    """Children save versions 2, 1, 2, ... over version 1 and are SIGKILLed at random moments; each
    folder then loads as one complete version (both adapters from the same one), never a mix."""
    expected = {version: _crash_outputs(_crash_model(version)) for version in (1, 2)}
    assert not torch.allclose(expected[1][0], expected[2][0]) and not torch.allclose(expected[1][1], expected[2][1])
    script = CHILD.format(source=inspect.getsource(_crash_model))
    delays = [random.Random(seed).uniform(0.0, 0.4) for seed in range(3)]
    folders = [tmp_path / f"run{i}" / "adapter" for i in range(len(delays))]
    children = []
    try:
        for folder in folders:
            _crash_model(1).save_pretrained(folder)
            children.append(subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=tmp_path,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for child, delay in zip(children, delays):
            assert child.stdout.readline() == "ready\n", child.communicate(timeout=30)[1]
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for folder, child, delay in zip(folders, children, delays):
        saves = child.stdout.read().split()
        got = _load_crash_folder(folder)
        matches = [v for v, want in expected.items() if all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))]
        assert len(matches) == 1, f"killed after {delay:.3f}s ({len(saves)} saves done): a mix of versions"
        print(f"killed after {delay:.3f}s, {len(saves)} saves done: version {matches[0]}")
        leftovers = sorted(p.name for p in folder.parent.iterdir() if p != folder)
        assert all(name.startswith(".adapter.lorakit-tmp-") for name in leftovers), leftovers
        assert not any(".lorakit-" in p.name for p in folder.rglob("*")), "a temporary entry inside the adapter"
        # a crash's leftovers do not stand in the way of the next save
        _crash_model(2).save_pretrained(folder)
        assert all(torch.equal(g, w) for g, w in zip(_load_crash_folder(folder), expected[2]))


# ---- other files in the folder --------------------------------------------------------------------------
# README.md is not foreign: save_pretrained updates it as PEFT's model card (test_save_safety, test_peft_api_extras)
FOREIGN = {"tokenizer.json": b'{"model": {}}', "NOTES.md": b"# notes\n", "checkpoint-1/x.txt": b"step 1",
           "checkpoint-1/deeper/optimizer.pt": b"\0\1\2", "other/notes.txt": b"kept next to adapter 'other'"}


@pytest.mark.parametrize("first_safe, second_safe", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["st->st", "bin->st", "st->bin", "bin->bin"])
def test_save_keeps_foreign_files_and_drops_stale_weights(tmp_path, first_safe, second_safe):
    folder = tmp_path / "adapter"
    model = llama_peft(seed=1)
    model.add_adapter("other", LoraConfig(**LLAMA_CONFIG))
    randomize_lora(model, seed=1)
    model.save_pretrained(folder, safe_serialization=first_safe)
    for name, data in FOREIGN.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    randomize_lora(model, seed=2)
    model.save_pretrained(folder, safe_serialization=second_safe)
    written, stale = (WEIGHTS, BIN) if second_safe else (BIN, WEIGHTS)
    for sub in (folder, folder / "other"):
        assert (sub / written).is_file() and not (sub / stale).exists(), sorted(p.name for p in sub.iterdir())
    for name, data in FOREIGN.items():
        assert (folder / name).read_bytes() == data, name
    assert not any(".lorakit-" in p.name for p in tmp_path.rglob("*"))
    loaded = PeftModel.from_pretrained(build("llama"), folder)
    loaded.load_adapter(folder, "other", subfolder="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(outputs(loaded, "llama"), outputs(model, "llama"), atol=0, rtol=0)


def test_save_through_symlinked_folder(tmp_path):
    """save_pretrained(link) writes into the link's destination (as PEFT's plain writes do) and keeps the link."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "tokenizer.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    model = llama_peft(seed=1)
    model.save_pretrained(link)
    assert link.is_symlink(), "the symlink was replaced by a folder"
    assert (real / WEIGHTS).is_file() and (real / "tokenizer.json").is_file(), sorted(os.listdir(real))
    assert sorted(os.listdir(tmp_path)) == ["link", "real"], "stray entries next to the folder"
    torch.testing.assert_close(outputs(PeftModel.from_pretrained(build("llama"), real), "llama"),
                               outputs(model, "llama"), atol=0, rtol=0)


# ---- hostile adapter names ----------------------------------------------------------------------------------
HOSTILE_NAMES = ["../x", "/abs", "a/b", "a.b", "", "__base__", " x", "x\n", "a b", "..", None, 3,
                 # attributes of nn.ModuleDict / nn.ParameterDict, which hold the adapters by name
                 "training", "forward", "keys", "_modules",
                 # module names of the model: state-dict keys would become ambiguous
                 "lin1", "emb"]
MLP_TARGETS = {"target_modules": ["emb", "conv", "lin1", "lin2"]}


@pytest.fixture(scope="module")
def mlp_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mlp") / "adapter"
    model = get_peft_model(build("mlp"), LoraConfig(**MLP_TARGETS))
    randomize_lora(model, 1)
    model.save_pretrained(folder)
    return folder


def _mlp_peft() -> PeftModel:
    model = get_peft_model(build("mlp"), LoraConfig(**MLP_TARGETS))
    randomize_lora(model, 2)
    return model


NAME_OPERATIONS = {
    "get_peft_model": lambda name, folder: (build("mlp"),
                                            lambda m: get_peft_model(m, LoraConfig(**MLP_TARGETS), adapter_name=name)),
    "add_adapter": lambda name, folder: (_mlp_peft(), lambda m: m.add_adapter(name, LoraConfig(**MLP_TARGETS))),
    "load_adapter": lambda name, folder: (_mlp_peft(), lambda m: m.load_adapter(folder, name)),
    "from_pretrained": lambda name, folder: (build("mlp"),
                                             lambda m: PeftModel.from_pretrained(m, folder, adapter_name=name)),
    "save selected": lambda name, folder: (_mlp_peft(),
                                           lambda m: m.save_pretrained(folder.parent / "out", selected_adapters=[name])),
}


@pytest.mark.parametrize("operation", NAME_OPERATIONS)
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_adapter_name_refused(mlp_adapter, tmp_path, name, operation):
    folder = tmp_path / "work" / "adapter"
    shutil.copytree(mlp_adapter, folder)
    model, act = NAME_OPERATIONS[operation](name, folder)
    before, on_disk = snapshot(model), tree(tmp_path)
    with pytest.raises(ValueError, match="adapter"):
        act(model)
    assert_unchanged(model, before)
    if isinstance(model, PeftModel):
        assert list(model.peft_config) == ["default"]
    else:
        assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert tree(tmp_path) == on_disk, "something was written"


# ---- configs written by other PEFT versions ---------------------------------------------------------------
def _lora_warnings(load: Callable[[], PeftModel]) -> tuple[PeftModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    return model, [str(w.message) for w in caught if issubclass(w.category, LoraWarning)]


def test_unknown_config_keys_warn_once(adapter):
    reference = outputs(PeftModel.from_pretrained(build("llama"), adapter), "llama")
    edit_config(future_option=True, another_new_field={"x": 1})(adapter)
    model, messages = _lora_warnings(lambda: PeftModel.from_pretrained(build("llama"), adapter))
    assert len(messages) == 1, messages
    assert "future_option" in messages[0] and "another_new_field" in messages[0] and CONFIG in messages[0]
    torch.testing.assert_close(outputs(model, "llama"), reference, atol=0, rtol=0)


# keys a config written by an older PEFT lacks (0.6-era: no DoRA, no exclusions, no peft_version, ...)
NEWER_KEYS = ["alora_invocation_tokens", "arrow_config", "corda_config", "ensure_weight_tying", "eva_config",
              "exclude_modules", "kasa_config", "layer_replication", "lora_bias", "lora_ga_config", "megatron_config",
              "megatron_core", "monteclora_config", "peft_version", "qalora_group_size", "target_parameters",
              "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
              "loftq_config", "layers_pattern", "rank_pattern", "alpha_pattern"]


@pytest.mark.parametrize("keep", ["older PEFT", "minimal", "no peft_type"])
def test_missing_optional_config_keys_load_silently(adapter, keep):
    reference = outputs(PeftModel.from_pretrained(build("llama"), adapter), "llama")
    data = json.loads((adapter / CONFIG).read_text())
    if keep != "older PEFT":
        kept = ("r", "lora_alpha", "target_modules") + (("peft_type",) if keep == "minimal" else ())
        data = {k: data[k] for k in kept}
    else:
        data = {k: v for k, v in data.items() if k not in NEWER_KEYS}
    (adapter / CONFIG).write_text(json.dumps(data))
    model, messages = _lora_warnings(lambda: PeftModel.from_pretrained(build("llama"), adapter))
    assert messages == []
    torch.testing.assert_close(outputs(model, "llama"), reference, atol=0, rtol=0)
