"""PEFT's keywords and public pieces that need no peft to check: each honoured (tested against its meaning) or
refused with an error naming it; push_to_hub and Hub loading through a fake huggingface_hub (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from test_peft_behaviour import mlp

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model


def saved(tmp_path: Path, **config) -> tuple[PeftModel, Path]:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False, **config))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


# ---- keywords: refused with a clear error ----------------------------------------------------------------------
REFUSED = [
    (dict(ignore_mismatched_sizes=True), ValueError, "ignore_mismatched_sizes"),
    (dict(revison="main"), TypeError, "did you mean 'revision'"),
    (dict(key_mapping=["not", "a", "dict"]), TypeError, "key_mapping"),
]


@pytest.mark.parametrize("kwargs, error, match", REFUSED)
@pytest.mark.parametrize("method", ["from_pretrained", "load_adapter"])
def test_load_keywords_refused(tmp_path, method, kwargs, error, match):
    _, folder = saved(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), folder)
    before = sorted(loaded.state_dict())
    with pytest.raises(error, match=match):
        if method == "from_pretrained":
            PeftModel.from_pretrained(mlp(), folder, **kwargs)
        else:
            loaded.load_adapter(folder, "other", **kwargs)
    assert sorted(loaded.state_dict()) == before and list(loaded.peft_config) == ["default"]


@pytest.mark.parametrize("kwargs, error, match", [(dict(push_to_hubb=True), TypeError, "push_to_hubb")])
def test_save_keywords_refused(tmp_path, kwargs, error, match):
    model, _ = saved(tmp_path)
    with pytest.raises(error, match=match):
        model.save_pretrained(tmp_path / "again", **kwargs)


# ---- keywords: honoured -----------------------------------------------------------------------------------------
def test_key_mapping_renames_file_keys(tmp_path):
    model, folder = saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file({k.replace("lin0", "first"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    with pytest.raises(lorakit.AdapterLoadError, match="unexpected key"):
        PeftModel.from_pretrained(mlp(), renamed)
    loaded = PeftModel.from_pretrained(mlp(), renamed, key_mapping={r"^first\.": "lin0.", r"never": "x"})
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def test_use_safetensors_false_reads_the_bin_file(tmp_path):
    model, folder = saved(tmp_path)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    both = tmp_path / "bin"
    state = load_file(folder / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(both / "adapter_model.safetensors"))
    zeros = PeftModel.from_pretrained(mlp(), both)  # safetensors first: the zeroed copy
    from_bin = PeftModel.from_pretrained(mlp(), both, use_safetensors=False)
    torch.testing.assert_close(from_bin(X), model(X), rtol=0, atol=0)
    torch.testing.assert_close(zeros(X), mlp()(X), rtol=0, atol=0)


def test_torch_device_and_low_cpu_mem_usage_load_onto_the_model(tmp_path):
    model, folder = saved(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), folder, torch_device="cpu", low_cpu_mem_usage=True)
    result = loaded.load_adapter(folder, "other", torch_device="cpu", low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def test_save_pretrained_state_dict_keyword_takes_tensors_from_it(tmp_path):
    model, _ = saved(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["base_model.model.lin0.lora_B.default.weight"] += 1.0
    model.save_pretrained(tmp_path / "given", state_dict=state)
    written = load_file(tmp_path / "given" / "adapter_model.safetensors")
    torch.testing.assert_close(written["base_model.model.lin0.lora_B.weight"],
                               state["base_model.model.lin0.lora_B.default.weight"], rtol=0, atol=0)


def test_add_adapter_low_cpu_mem_usage_is_meta_until_loaded(tmp_path):
    source, _ = saved(tmp_path, use_dora=True)
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin1"]))
    model.add_adapter("late", LoraConfig(target_modules=["lin0"], use_dora=True), low_cpu_mem_usage=True)
    late = {n: p.device.type for n, p in model.named_parameters() if ".late" in n}
    assert set(late.values()) == {"meta"} and any("magnitude" in n for n in late)
    state = lorakit.get_peft_model_state_dict(source)
    lorakit.set_peft_model_state_dict(model, state, adapter_name="late", low_cpu_mem_usage=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model.set_adapter("late")
    torch.testing.assert_close(model(X), source(X), rtol=1e-6, atol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".late" in n)


# ---- Hub: push and pull through a fake huggingface_hub ------------------------------------------------------------
class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        import shutil

        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://hub.example/{repo_id}/commit/1"

    def snapshot_download(self, repo_id, *, allow_patterns=None, **kwargs):
        self.calls.append(("snapshot_download", repo_id, {"allow_patterns": allow_patterns, **kwargs}))
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(repo_id)
        return str(self.root / repo_id)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    for name in ("create_repo", "upload_folder", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, getattr(hub, name))
    return hub


def test_push_to_hub_uploads_the_saved_folder_and_card(fake_hub, tmp_path):
    model, _ = saved(tmp_path)
    url = model.push_to_hub("me/adapter", private=True, token="t", commit_message="first", tags=["my-tag"])
    assert url == "https://hub.example/me/adapter/commit/1"
    repo = fake_hub.root / "me/adapter"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (repo / "README.md").read_text()
    assert "library_name: peft" in card and "- my-tag" in card and "- lora" in card
    assert fake_hub.calls[0] == ("create_repo", "me/adapter", dict(private=True, token="t", exist_ok=True))
    assert fake_hub.calls[1][2]["commit_message"] == "first"
    with pytest.raises(ValueError, match="max_shard_size"):
        model.push_to_hub("me/adapter", max_shard_size=10)


def test_from_pretrained_downloads_a_hub_repo(fake_hub, tmp_path):
    model, _ = saved(tmp_path)
    model.push_to_hub("me/adapter")
    loaded = PeftModel.from_pretrained(mlp(), "me/adapter", revision="main", token="t")
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
    name, repo, kwargs = fake_hub.calls[-1]
    assert (name, repo, kwargs["revision"], kwargs["token"]) == ("snapshot_download", "me/adapter", "main", "t")
    assert "adapter_model.safetensors" in kwargs["allow_patterns"]
    with pytest.raises(lorakit.AdapterLoadError, match="neither a local folder nor a Hub repository"):
        PeftModel.from_pretrained(mlp(), "me/missing")


def test_model_card_without_huggingface_hub(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    model, _ = saved(tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    model.save_pretrained(tmp_path / "plain")
    text = (tmp_path / "plain" / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: peft\ntags:\n- lora\n---\n")
    json.loads((tmp_path / "plain" / "adapter_config.json").read_text())


@pytest.mark.parametrize("method, words", [("merge_and_unload", "Unloading and merging model"), ("unload", None)])
def test_unload_progressbar_is_shown(tmp_path, capsys, method, words):
    model, _ = saved(tmp_path)
    expected = model(X)
    if words is None:  # unload() takes no progressbar (PEFT's signature): a TypeError, not silence
        with pytest.raises(TypeError):
            getattr(model, method)(progressbar=True)
        return
    merged = getattr(model, method)(progressbar=True)
    assert words in capsys.readouterr().err
    torch.testing.assert_close(merged(X), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("offloaded", [False, True])
def test_offload_keywords_act_only_on_offloaded_models(tmp_path, offloaded):
    model, folder = saved(tmp_path)
    base = mlp()
    base.hf_device_map = {"lin0": "cpu", "lin1": "disk"} if offloaded else {"": "cpu"}
    kwargs = dict(device_map={"": "cpu"}, max_memory={"cpu": "1GB"}, offload_folder=str(tmp_path / "off"))
    if offloaded:
        with pytest.raises(NotImplementedError, match="device_map"):
            PeftModel.from_pretrained(base, folder, **kwargs)
        return
    loaded = PeftModel.from_pretrained(base, folder, **kwargs)  # no offload: nothing to dispatch, as in PEFT
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
