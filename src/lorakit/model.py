"""PeftModel and get_peft_model: the user-facing wrapper, drop-in for PEFT's.

``get_peft_model(model, config)`` returns a ``PeftModel`` (or the task-specific class named by
``config.task_type``) whose ``base_model`` is the ``LoraModel`` tuner. Attributes it does not have are
looked up on the tuner, then on the user's model, so ``peft_model.generate``, ``peft_model.config`` and
``peft_model.merge_and_unload()`` work as with PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoraConfig, LoraRuntimeConfig, TaskType
from .convert import save_converted
from .distributed import is_sharded
from .sharded_save import save_sharded
from .errors import explain, warn
from .functional import IncompatibleKeys
from .hotswap import hotswap_adapter
from .integrations.signature import bind_forward_signature
from .load_options import LoadOptions, save_state_dict
from .plan import Plan, check_adapter_name, check_config as _check_config
from . import hub, io, model_card, save_checks, status, training_checks
from .tuner import LoraModel, planned
from .variants import ModelCall, call_context


class PeftModel(nn.Module):
    """A model with LoRA adapters: ``base_model`` is the tuner, ``base_model.model`` the user's model.

    Raises:
        ValueError: invalid config, adapter name or targets (see ``targeting.resolve_targets``).
        NotImplementedError: the config sets a PEFT feature lorakit does not run yet, naming it.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, *,
                 plan: Plan | None = None) -> None:
        """``plan``: the caller's ``plan_adapter`` of ``peft_config`` for ``model`` (e.g. checked against a file)."""
        super().__init__()
        _check_config(peft_config)
        self.peft_type = "LORA"
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        with contextlib.ExitStack() as stack:
            if plan is None:
                plan = stack.enter_context(planned(model, peft_config, adapter_name,
                                                   low_cpu_mem_usage=low_cpu_mem_usage))
            self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                        plan=plan)
        checkpointing = _is_checkpointing(model, plan.candidates)  # the modules as planned: no walk
        bind_forward_signature(self, model)  # Trainer keeps the dataset columns the wrapped forward accepts
        if checkpointing:
            self._enable_input_grads()

    # Only here does lorakit forward attribute lookups (STYLE.md section 3): tuner first, then the model.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        tuner = super().__getattr__("base_model")
        try:
            return getattr(tuner, name)
        except AttributeError:
            return getattr(getattr(tuner, "model"), name)

    _lorakit_frozen_load = False  # set by from_pretrained(is_trainable=False); see training_checks

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (one per row) runs a mixed-adapter batch."""
        if self._lorakit_frozen_load and self.training and torch.is_grad_enabled():
            training_checks.check_frozen_training(self)
        with self._routing(adapter_names, args, kwargs), self._variant_context(adapter_names, args, kwargs, False):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` gives each row (and its beams) its adapter.

        Raises:
            AttributeError: the wrapped model cannot generate.
        """
        generate = getattr(self.get_base_model(), "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.get_base_model()).__name__} has no generate()")
        with self._routing(adapter_names, args, kwargs), self._variant_context(adapter_names, args, kwargs, True):
            return generate(*args, **kwargs)

    def _variant_context(self, adapter_names: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                         generate: bool) -> contextlib.AbstractContextManager[object]:
        """The variants' per-call contexts (``Variant.context``; aLoRA's invocation offsets); pops their kwargs."""
        return call_context(ModelCall(self.peft_config, self.active_adapters, adapter_names, args, kwargs, generate))

    def _routing(self, adapter_names: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> contextlib.AbstractContextManager[object]:
        if adapter_names is None:
            return contextlib.nullcontext()
        batch = _batch_size(args, kwargs)
        if batch is not None and len(adapter_names) != batch:
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {batch} respectively. "
                             + explain("adapter_names needs one name per row", got=f"{len(adapter_names)} names",
                                       expected=f"{batch} (the batch size)"))
        return self.base_model.routed(list(adapter_names))

    # ---- PEFT's read-only views ----------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    # PEFT's methods that are module functions applied to the model: ``peft_model.f()`` is ``f(peft_model)``.
    get_layer_status = status.get_layer_status
    get_model_status = status.get_model_status
    create_or_update_model_card = model_card.create_or_update_model_card

    def get_base_model(self) -> nn.Module:
        """The user's model (with LoRA layers in it)."""
        return self.base_model.model

    # ---- parameters ----------------------------------------------------------------------------------------
    get_nb_trainable_parameters = status.count_parameters  # (trainable, all), counted as PEFT counts them

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- adapters ------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a frozen, inactive adapter; ``set_adapter`` makes it the one that runs and trains.

        ``autocast_adapter_dtype``: float32 factors over a half-precision base (else the base's dtype).
        ``low_cpu_mem_usage``: empty factors on the meta device, for a load to fill (see LoraModel.inject_adapter).
        """
        _check_config(peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype,
                                       low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several whose outputs add; ``inference_mode=True`` leaves them frozen."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the named adapters' parameters (LoRA factors, modules_to_save copies) trainable or frozen."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @property
    def active_peft_config(self) -> LoraConfig:
        """The config of the active adapter (of the first one when several are active)."""
        return self.peft_config[self.active_adapters[0]]

    push_to_hub = hub.push_to_hub  # upload the adapters and their model card (needs huggingface_hub)

    # ---- adapters on disk ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """Write the adapters as PEFT does: "default" in ``save_directory``, others in ``<dir>/<name>``.

        The folder is replaced atomically: a crash leaves the previous adapter or the new one, whole. With
        ``path_initial_model_for_weight_conversion`` (the folder saved right after a PiSSA/OLoRA/LoftQ/CorDA
        init), a residual-init adapter is written as plain LoRA of rank 2r against the original base
        weights (convert.py).

        Raises:
            ValueError: an unknown adapter in ``selected_adapters``, or an initial adapter that does not fit.
        """
        if is_sharded(self):  # FSDP2: every rank must take part in the gather
            return save_sharded(self, save_directory, selected_adapters, safe_serialization,
                                save_embedding_layers, is_main_process, path_initial_model_for_weight_conversion)
        if not is_main_process:
            return
        state_dict = save_state_dict(kwargs)
        if path_initial_model_for_weight_conversion is not None:
            if state_dict is not None:
                raise NotImplementedError("save_pretrained: state_dict= together with "
                                          "path_initial_model_for_weight_conversion is not supported")
            save_converted(self, save_directory, path_initial_model_for_weight_conversion, selected_adapters,
                           safe_serialization, save_embedding_layers)
        else:
            gathered = None
            if state_dict is not None:  # the adapter tensors come from the given state dict (PEFT's kwarg)
                embeddings = save_checks.embedding_layers_to_save(self, save_embedding_layers)
                gathered = {name: io.adapter_state_dict(self, name, embeddings, state=state_dict)
                            for name in (selected_adapters or list(self.peft_config)) if name in self.peft_config}
            io.save_adapters(self, save_directory, selected_adapters, safe_serialization, save_embedding_layers,
                             gathered=gathered)
        self.create_or_update_model_card(save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        **kwargs: Any) -> PeftModel:
        """Load an adapter folder (PEFT's or lorakit's, local or on the Hub) onto ``model``; frozen and in eval
        mode unless ``is_trainable``.

        ``config``: use this LoraConfig instead of the folder's ``adapter_config.json`` (it is the object the
        model then holds, with ``inference_mode = not is_trainable``, as in PEFT). The folder is validated against
        the model, with the config that is injected, before anything changes: one error lists every problem.
        Other keywords as in PEFT (``load_options.LoadOptions``): ``torch_device``, ``key_mapping``,
        ``subfolder``, Hub download keywords; ``low_cpu_mem_usage`` is how lorakit always loads (no init is
        drawn for factors a file fills).

        Raises:
            lorakit.io.AdapterLoadError: a missing, corrupted or mismatched adapter (a ValueError).
            TypeError: an unknown keyword. NotImplementedError: a PEFT option lorakit does not run (named).
        """
        options = LoadOptions.parse("from_pretrained", ephemeral_gpu_offload, key_mapping, kwargs, model)
        folder = options.folder(model_id)
        check_adapter_name(adapter_name)  # the name alone; plan_adapter checks it against the model's modules
        if config is not None:
            _check_config(config)
            config.inference_mode = not is_trainable
        read_config, tensors = io.read_adapter(folder, is_trainable, config=config, device=options.torch_device,
                                               key_mapping=key_mapping, use_safetensors=options.use_safetensors)
        read_config.runtime_config = LoraRuntimeConfig(ephemeral_gpu_offload=ephemeral_gpu_offload)  # as PEFT sets it
        return cls.from_tensors(model, read_config, tensors, adapter_name, folder, is_trainable,
                                autocast_adapter_dtype=autocast_adapter_dtype, adopt=True, caller_config=config)

    @classmethod
    def from_tensors(cls, model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], adapter_name: str,
                     source: str | os.PathLike[str], is_trainable: bool, autocast_adapter_dtype: bool = True,
                     adopt: bool = False, caller_config: LoraConfig | None = None) -> PeftModel:
        """The load pipeline on tensors under PEFT's file keys: plan (no init drawn), check the tensors against
        that plan, apply it, copy the tensors in. Nothing changes before the check passes. ``source`` names the
        tensors' origin in errors; ``adopt``: the tensors belong to no one else (``io.load_tensors``)."""
        wrapper = cls if cls is not PeftModel else _task_class(config)
        with _load_planned(model, config, adapter_name, {}, tensors, source) as (plan, tensors):
            peft_model = wrapper(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                 plan=plan)
        io.load_tensors(peft_model.get_base_model(), tensors, adopt=adopt)
        if caller_config is not None:
            peft_model.base_model.adopt_config(adapter_name, caller_config)
        training_checks.frozen_load_flag(peft_model, is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, **kwargs: Any) -> IncompatibleKeys:
        """Add the adapter in ``model_id`` as ``adapter_name`` (inactive until ``set_adapter``).

        Returns PEFT's load result: ``missing_keys`` (this adapter's tensors the file lacked: always empty, the
        folder is validated first) and ``unexpected_keys``. Keywords as in ``from_pretrained``.

        ``hotswap=True``: replace the weights of the loaded adapter ``adapter_name`` in place instead
        (lorakit.hotswap.hotswap_adapter: a compiled model does not recompile).

        Raises:
            lorakit.io.AdapterLoadError: the folder does not fit this model; nothing was changed.
        """
        if kwargs.pop("hotswap", False):
            if adapter_name not in self.peft_config:
                raise ValueError("To hotswap an adapter, there must already be an existing adapter with the same "
                                 f"adapter name. (lorakit: no adapter {adapter_name!r} is loaded.)")
            hotswap_adapter(self, model_id, adapter_name, torch_device=torch_device, **kwargs)
            return IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        options = LoadOptions.parse("load_adapter", ephemeral_gpu_offload, key_mapping,
                                    {**kwargs, "torch_device": torch_device}, self.get_base_model())
        folder = options.folder(model_id)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists. "
                             + explain("load_adapter adds a new adapter", fix="pick another adapter_name, or pass "
                                       "hotswap=True to replace this adapter's weights in place"))
        check_adapter_name(adapter_name)
        config, tensors = io.read_adapter(folder, is_trainable, device=options.torch_device, key_mapping=key_mapping,
                                          use_safetensors=options.use_safetensors)
        config.runtime_config = LoraRuntimeConfig(ephemeral_gpu_offload=ephemeral_gpu_offload)
        self.add_from_tensors(config, tensors, adapter_name, folder, is_trainable, autocast_adapter_dtype, adopt=True)
        return IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def add_from_tensors(self, config: LoraConfig, tensors: dict[str, Tensor], adapter_name: str,
                         source: str | os.PathLike[str], is_trainable: bool, autocast_adapter_dtype: bool = True,
                         adopt: bool = False) -> None:
        """``from_tensors`` for a further adapter (inactive until ``set_adapter``): plan, check, apply, copy."""
        _check_config(config)  # e.g. ephemeral_gpu_offload with DoRA: refused before anything changes
        model, tuner = self.get_base_model(), self.base_model
        with _load_planned(model, config, adapter_name, tuner.peft_config, tensors, source,
                           tuner_name=type(tuner).__name__) as (plan, tensors):
            tuner.apply_plan(plan, autocast_adapter_dtype)
        io.load_tensors(model, tensors, adopt=adopt)
        if is_trainable:  # peft 0.21.2: the loaded adapter trains (its factors and modules_to_save copies), active or not
            self.base_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (merged adapters are unmerged first).

        On exit each adapter layer is as before: enabled, or still disabled when all were disabled already. A
        mix of enabled and disabled layers cannot be restored as it was: all are enabled then, with a warning.
        """
        before = self.base_model.adapter_layers_disabled()
        if before is None:
            warn("The model contains some adapter layers that are enabled and others that are disabled. This is most "
                 "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled")
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if before is not True:
                self.base_model.enable_adapter_layers()

    # ---- training helpers passed through to a transformers model -----------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Turn on the model's activation checkpointing and make its inputs require grad.

        With a frozen embedding, reentrant checkpointing sees no input that requires grad and would drop
        every LoRA gradient; PEFT calls ``enable_input_require_grads`` for the same reason. transformers 5
        renamed the method ``activation_checkpointing_enable``; both names work here, on both versions.
        """
        model: Any = self.get_base_model()  # a transformers model: its methods are checked for by name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        self._enable_input_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT's: make ``model``'s input embeddings' output require grad (left alone for quantized models)."""
        if not any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            self._enable_input_grads(model)
        return model

    def _enable_input_grads(self, model: nn.Module | None = None) -> None:
        model = self.get_base_model() if model is None else model
        getter: Any = getattr(model, "get_input_embeddings", None)
        if hasattr(model, "enable_input_require_grads"):
            getattr(model, "enable_input_require_grads")()
        elif getter is not None:
            getter().register_forward_hook(lambda module, args, output: output.requires_grad_(True))


@contextlib.contextmanager
def _load_planned(model: nn.Module, config: LoraConfig, adapter_name: str, existing: dict[str, LoraConfig],
                  tensors: dict[str, Tensor], source: str | os.PathLike[str],
                  tuner_name: str = "LoraModel") -> Iterator[tuple[Plan, dict[str, Tensor]]]:
    """``planned`` for a load, and ``tensors`` checked against that one plan (io.check_against_plan): every factor
    follows from the file, so no init is drawn; the block applies the plan (the file's keys name the copies of
    ``layer_replication``, made meanwhile).

    Raises:
        lorakit.io.AdapterLoadError: the config does not fit the model (a targeting error, named), or the tensors
            do not fit the plan.
        ValueError: an adapter name in use or invalid.
    """
    def load_error(error: Exception) -> Exception:
        return io.AdapterLoadError(f"cannot load adapter {str(source)!r}: {error}")

    with planned(model, config, adapter_name, existing, tuner_name=tuner_name, weights_follow=True,
                 targeting_error=load_error) as plan:
        yield plan, io.check_against_plan(model, plan, tensors, source)


def _is_checkpointing(model: nn.Module, candidates: Sequence[tuple[str, nn.Module]]) -> bool:
    """transformers' ``is_activation_checkpointing`` (4: ``is_gradient_checkpointing``): a submodule has
    ``gradient_checkpointing`` set. Read from each module's own attributes: transformers' ``hasattr`` walk
    raises and catches an AttributeError per module, a tenth of ``get_peft_model``'s time on a small config."""
    if not any(isinstance(getattr(type(model), name, None), property)
               for name in ("is_activation_checkpointing", "is_gradient_checkpointing")):
        return False
    return any(bool(vars(module).get("gradient_checkpointing", getattr(type(module), "gradient_checkpointing", False)))
               for module in (model, *(module for _, module in candidates)))


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


# PEFT's task classes. They subclass PeftModel (our one exception to "no subclasses of our own classes")
# because user code tests isinstance(model, PeftModel) and reads the class name; all behaviour stays above.
class PeftModelForCausalLM(PeftModel):
    """Causal language models: forward and ``generate`` pass through to the wrapped model."""

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.get_base_model(), "prepare_inputs_for_generation")(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """Encoder-decoder language models."""


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classifiers; ``classifier`` / ``score`` are trained in full (modules_to_save)."""


class PeftModelForTokenClassification(PeftModel):
    """Token classifiers; ``classifier`` / ``score`` are trained in full (modules_to_save)."""


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA; ``qa_outputs`` is trained in full (modules_to_save)."""


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for their hidden states."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str | None, type[PeftModel]] = {
    None: PeftModel,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def _task_class(config: LoraConfig) -> type[PeftModel]:
    """The PeftModel class of ``config.task_type`` (PeftModel itself for None)."""
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING[getattr(config.task_type, "value", config.task_type)]


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Inject LoRA into ``model`` (in place) and wrap it in the PeftModel class of ``peft_config.task_type``.

    Raises:
        ValueError: a non-LoRA config, a model that already is a PeftModel, an adapter name already in use,
            or any targeting error (nothing matched, unsupported type, ...).
        NotImplementedError: ``mixed=True`` or a PEFT feature lorakit does not run yet.
    """
    if isinstance(model, PeftModel):
        raise ValueError(explain("model is already a PeftModel", got=type(model).__name__,
                                 fix="call model.add_adapter(name, config) to add another adapter"))
    if mixed:
        raise NotImplementedError("mixed=True (PeftMixedModel, several adapter types) is not supported: "
                                  "lorakit implements LoRA only, and several LoRA adapters need no mixed model")
    _check_config(peft_config)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config = dataclasses.replace(peft_config, base_model_name_or_path=name_or_path)
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    cls = _task_class(peft_config)
    with planned(model, peft_config, adapter_name, second_injection=True, low_cpu_mem_usage=low_cpu_mem_usage) as plan:
        peft_model = cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, plan=plan)
    training_checks.check_trainable(peft_model)
    return peft_model


status.PEFT_MODEL_CLASSES.append(PeftModel)  # status.py tells a PeftModel from a plain model by this list
