"""The Hugging Face Hub, through ``huggingface_hub`` (an optional dependency): adapters pushed and pulled.

``push_to_hub`` saves the adapters (with their model card) into a temporary folder and uploads it as one
commit, like transformers' ``PushToHubMixin`` that PEFT's ``PeftModel`` uses. ``resolve_folder`` turns the
``model_id`` of ``from_pretrained`` / ``load_adapter`` into a local folder: a folder on disk as it is, else a
Hub repository downloaded (only its adapter files) into huggingface_hub's cache, with the download keywords
PEFT passes on (``revision``, ``cache_dir``, ``token``, ``force_download``, ``local_files_only``, ...).
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Any


from .errors import AdapterLoadError, explain, unknown_argument

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # io.CONFIG_NAME, ...


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("the Hugging Face Hub needs the huggingface_hub package: pip install huggingface_hub "
                          "(or save_pretrained / from_pretrained with a local folder)") from None
    return huggingface_hub


# huggingface_hub.snapshot_download's keywords (used when it is not installed, to check names all the same)
_DOWNLOAD_KEYWORDS = {"repo_type", "revision", "cache_dir", "local_dir", "library_name", "library_version",
                      "user_agent", "etag_timeout", "force_download", "token", "local_files_only",
                      "ignore_patterns", "max_workers", "tqdm_class", "headers", "endpoint", "proxies"}


def download_keywords() -> set[str]:
    """The keywords ``resolve_folder`` passes to ``huggingface_hub.snapshot_download`` (plus ``use_auth_token``)."""
    try:
        parameters = inspect.signature(_hub().snapshot_download).parameters.values()
    except ImportError:
        return set(_DOWNLOAD_KEYWORDS) | {"use_auth_token"}
    names = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in parameters):  # a wrapper that passes keywords on
        names |= _DOWNLOAD_KEYWORDS
    names -= {"repo_id", "allow_patterns"}
    return names | {"use_auth_token"}


def resolve_folder(model_id: str | os.PathLike[str], subfolder: str | None, hub_kwargs: dict[str, Any],
                   owner: str = "from_pretrained") -> Path:
    """The local folder holding the adapter ``model_id`` (``<model_id>/<subfolder>`` when given).

    A local folder is used as it is (the download keywords only concern the Hub, as in PEFT); anything else that
    looks like ``owner/name`` is downloaded.

    Raises:
        ImportError: ``model_id`` is no local folder and huggingface_hub is not installed.
        TypeError: a keyword that neither lorakit nor huggingface_hub's download takes.
    """
    allowed = download_keywords()
    for name in hub_kwargs:
        if name not in allowed:
            raise unknown_argument(owner, name, allowed)
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if Path(model_id).is_dir() or not _looks_like_repo_id(str(model_id)):
        return local  # a missing folder is reported by io.read_config, naming the path
    kwargs = dict(hub_kwargs)
    if "use_auth_token" in kwargs:
        kwargs["token"] = kwargs.pop("use_auth_token")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    hub = _hub()
    try:
        root = hub.snapshot_download(repo_id=str(model_id), allow_patterns=[prefix + name for name in ADAPTER_FILES],
                                     **kwargs)
    except Exception as error:  # offline, no such repo, no access: huggingface_hub raises many types

        raise AdapterLoadError(f"{str(model_id)!r} is neither a local folder nor a Hub repository that could be "
                               f"downloaded ({type(error).__name__}: {error}); point at the folder save_pretrained "
                               "wrote") from None
    return Path(root) / subfolder if subfolder else Path(root)


def _looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text) is not None and not text.startswith((".", "/"))


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or "50GB" / "500MB" / "10KiB" (decimal and binary units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size.upper().replace("IB", "iB"))
    if match is None:
        raise ValueError(explain("invalid max_shard_size", got=size, expected="an int (bytes) or e.g. '50GB', '5GiB'"))
    unit = match.group(2)
    base = 1024 if "i" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(match.group(1)) * base ** power)


def push_to_hub(peft_model: Any, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                tags: list[str] | None = None) -> str:
    """Upload the adapters (as ``save_pretrained`` writes them, with the model card) to ``repo_id``.

    The repository is created when missing (``private`` applies then). Adapter files are never sharded (PEFT's
    format has one weights file per adapter): a file larger than ``max_shard_size`` is refused. ``tags`` join the
    model card's tags. Returns the commit's URL (huggingface_hub's ``CommitInfo``, a ``str``).

    Raises:
        ImportError: huggingface_hub is not installed.
        ValueError: an adapter file larger than ``max_shard_size``.
    """
    hub = _hub()
    hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        peft_model.save_pretrained(work_dir)
        if max_shard_size is not None:
            limit = parse_size(max_shard_size)
            too_big = [p.name for p in Path(work_dir).rglob("adapter_model.*") if p.stat().st_size > limit]
            if too_big:
                raise ValueError(explain(f"adapter file(s) {too_big} are larger than max_shard_size", got=max_shard_size,
                                         fix="PEFT's adapter format is one unsharded file per adapter; raise "
                                             "max_shard_size or pass None"))
        if tags:
            card = hub.ModelCard.load(Path(work_dir) / "README.md")
            card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
            card.save(Path(work_dir) / "README.md")
        url: str = hub.upload_folder(repo_id=repo_id, folder_path=work_dir,
                                     commit_message=commit_message or "Upload model",
                                     commit_description=commit_description, token=token, revision=revision,
                                     create_pr=create_pr)  # a CommitInfo, which is a str
        return url
