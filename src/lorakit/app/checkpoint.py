"""Training checkpoints that resume exactly and never unpickle: safetensors for tensors, JSON for the rest.

A checkpoint folder (written atomically, whole or not at all) holds

    adapter/                 the adapter in PEFT format (what ``from_pretrained`` loads)
    optimizer.safetensors    AdamW's per-parameter tensors as ``optimizer.{index}.{name}`` (exp_avg,
                             exp_avg_sq, step) and the random-number states as ``rng.torch`` / ``rng.cuda``
    trainer_state.json       step, tokens, seconds, losses, the optimizer's param_groups and scalar state,
                             the schedule, Python's ``random`` state and ``run`` (what the caller records:
                             the command's settings, the untrained model's held-out loss, ...)

Resuming is exact when every source of randomness in a step is restored: the data order is a pure
function of (seed, epoch, position) (``sft.batches``), dropout draws from torch's CPU generator (and the
CUDA one on GPUs), and Python's ``random`` is saved for any user code that draws from it. numpy's global
generator is not used by training and is not saved.

Nothing here calls ``pickle``: a checkpoint from an untrusted source can hold wrong numbers, not code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .training import NonFiniteError, TrainState

if TYPE_CHECKING:
    from ..model import PeftModel

FORMAT = 2  # trainer_state.json's "format"; 1 was trainer_state.pt (a torch pickle, no longer read)
STATE_FILE, TENSOR_FILE, LEGACY_FILE = "trainer_state.json", "optimizer.safetensors", "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged, from an older lorakit or from another configuration."""


# ---- saving ---------------------------------------------------------------------------------------------------
def save_checkpoint(model: PeftModel, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, state: TrainState,
                    folder: Path, run: dict | None = None) -> None:
    """Write ``folder`` atomically; ``run`` is stored as given (JSON values).

    Under torchrun every rank must call it with the PeftModel (DDP's ``.module``): rank 0 writes. An
    FSDP2-sharded model's adapter and optimizer state are gathered whole first, and the optimizer state is
    stored in the single-process layout, so a checkpoint resumes with any process count, sharded or not.

    Raises:
        NonFiniteError: an adapter weight is NaN or infinite (the previous checkpoint is kept).
        OSError: the folder cannot be written (the previous checkpoint is kept).
    """
    from ..atomic import replace_folder
    from ..distributed import is_sharded

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    sharded = distributed and is_sharded(model)
    _check_finite(model, state.step)
    gathered = None
    if sharded:
        from ..sharded_save import full_adapter_state_dict

        gathered = {name: full_adapter_state_dict(model, name) for name in model.peft_config}
        optimizer_state = _full_optimizer_state(model, optimizer)
    else:
        optimizer_state = optimizer.state_dict()
    if rank == 0:
        def write(staging: Path) -> None:
            if gathered is not None:
                from .. import io

                io.save_adapters(model, staging / "adapter", None, True, "auto", gathered=gathered)
            else:
                model.save_pretrained(staging / "adapter")
            _write_state(staging, optimizer_state, scheduler, state, run or {})

        replace_folder(folder, write, owned=(LEGACY_FILE,))
    if distributed:
        torch.distributed.barrier()


def _check_finite(model: nn.Module, step: int) -> None:
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"after step {step} the adapter holds NaN or infinite weights ({len(bad)} tensors, "
                             f"e.g. {bad[0]}); it was not saved")


def _write_state(staging: Path, optimizer_state: dict, scheduler: LambdaLR, state: TrainState, run: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, object]] = {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(staging / TENSOR_FILE))
    version, internal, gauss = random.getstate()
    document = {"format": FORMAT, "step": state.step, "tokens": state.tokens, "seconds": state.seconds,
                "losses": [list(point) for point in state.losses],
                "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
                "scheduler": scheduler.state_dict(), "python_random": [version, list(internal), gauss], "run": run}
    (staging / STATE_FILE).write_text(json.dumps(document, indent=1, default=_json_value), encoding="utf-8")


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_FILE}")


# ---- reading --------------------------------------------------------------------------------------------------
def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, optimizer.safetensors) of ``folder``, checked for shape; no pickle is read.

    Raises:
        CheckpointError: missing, older format, or damaged (one line saying which file and what to do).
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        if (folder / LEGACY_FILE).exists():
            raise CheckpointError(f"{folder} holds {LEGACY_FILE}, a pickle written by an older lorakit; lorakit "
                                  f"no longer reads pickles from checkpoints (they can run code). Start a new run "
                                  f"(the adapter in {folder / 'adapter'} loads with PeftModel.from_pretrained)")
        raise CheckpointError(f"no checkpoint in {folder} (no {STATE_FILE}); train without --resume first")
    try:
        document = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        from safetensors.torch import load_file

        tensors = load_file(str(folder / TENSOR_FILE))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT}")
        for key in ("step", "tokens", "seconds", "losses", "optimizer", "scheduler", "python_random", "run"):
            document[key]  # noqa: B018  (a KeyError names the missing field)
    except Exception as error:  # json, safetensors (SafetensorError), OSError, KeyError: all one line
        raise CheckpointError(f"checkpoint {folder} is damaged ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}); start a new run or restore a copy") from None
    return document, tensors


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's state as plain values: ``optimizer`` (``optimizer.state_dict()``'s layout), ``scheduler``,
    ``step``, ``tokens``, ``seconds``, ``losses``, ``run`` and the random-number states under ``rng``.

    Raises:
        CheckpointError: missing, older format, or damaged.
    """
    document, tensors = read_checkpoint(folder)
    try:
        optimizer = _optimizer_state(document, tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {folder} is damaged ({type(error).__name__}: {error})") from None
    rng = {"torch": tensors.get("rng.torch"), "cuda": tensors.get("rng.cuda"), "python": document["python_random"]}
    return {**{k: document[k] for k in ("step", "tokens", "seconds", "losses", "scheduler", "run")},
            "optimizer": optimizer, "rng": rng}


def load_trainer_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                       folder: Path) -> TrainState:
    """Restore optimizer, schedule and position from ``folder`` (sharded models too).

    The random-number states come back in ``TrainState.rng``; call ``restore_rng`` right before the first
    step, after any evaluation or sampling that might draw from the generators.

    Raises:
        CheckpointError: the checkpoint is damaged or does not match this configuration.
    """
    from ..distributed import is_sharded

    saved = read_trainer_state(folder)
    try:
        if is_sharded(model):
            _load_sharded_optimizer(model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} does not match this model and settings "
                              f"({' '.join(str(error).split())[:200]})") from None
    return TrainState(saved["step"], saved["tokens"], saved["seconds"],
                      [tuple(point) for point in saved["losses"]], rng=saved["rng"])


def _optimizer_state(document: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in document["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**group, **{k: tuple(v) for k, v in group.items() if k == "betas"}}
              for group in document["optimizer"]["param_groups"]]
    return {"state": state, "param_groups": groups}


def restore_rng(rng: dict | None) -> None:
    """Put back the generator states a checkpoint saved (a no-op for None)."""
    if not rng:
        return
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if rng.get("python"):
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))


def set_peak_lr(scheduler: LambdaLR, lr: float) -> None:
    """Make ``lr`` the schedule's peak from the current step on (``--lr`` changed on resume).

    LambdaLR computes lr_t = base_lr · factor(t); its state holds the old base_lr, so the base and the
    optimizer's current rate are both rewritten: lr_t = lr · factor(t) from this step.
    """
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def reschedule(scheduler: LambdaLR) -> None:
    """Recompute the current rate from the (new) schedule function, e.g. after --max-steps changed."""
    set_peak_lr(scheduler, float(scheduler.base_lrs[0]))


# ---- FSDP2: the optimizer state in the one-process layout -------------------------------------------------------
def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The sharded optimizer's state, gathered, re-keyed by parameter index as ``optimizer.state_dict()``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full: dict[str, Any] = get_optimizer_state_dict(model, optimizer,  # type: ignore[assignment]
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full.get("param_groups", [])]
    return {"state": {index[n]: v for n, v in full.get("state", {}).items()}, "param_groups": groups}


def _load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    full = {"state": {names[int(i)]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full,  # type: ignore[arg-type]
                             options=StateDictOptions(full_state_dict=True))

