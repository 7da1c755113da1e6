"""lorakit: LoRA fine-tuning for PyTorch, drop-in for PEFT's LoRA API and adapter format."""

from .variants.builtin import KasaConfig, MontecloraConfig  # first: registers lorakit's variants, in order
from .calibrate import get_eva_state_dict, initialize_lora_eva_weights
from .corda import preprocess_corda
from .config import BdLoraConfig, CordaConfig, EvaConfig, LoftQConfig, LoraConfig, LoraRuntimeConfig, PeftType, TaskType
from .errors import LoraWarning
from .functional import get_base_model_state_dict, inject_adapter_in_model, set_base_model_state_dict
from .merge_check import MergeCheck
from .save_checks import AdapterSaveError
from .training_checks import check_training
from .io import AdapterLoadError, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .intruders import reduce_intruder_dimension
from .kbit import prepare_model_for_kbit_training, quantize_model
from .kinds import Kind, register_kind
from .loraga import LoraGAConfig, preprocess_loraga
from .variants.arrow import ArrowConfig, create_arrow_model
from .layer import LoraLayer
from .loftq import replace_lora_weights_loftq
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuner import LoraModel
from .variants.velora import VeloraConfig
from .version import __version__
from .integrations import install as _install_integrations

_install_integrations()  # lazy: only post-import hooks; transformers / TRL are adjusted when the user imports them


__all__ = [
    "prepare_model_for_kbit_training",
    "quantize_model",
    "AdapterLoadError",
    "AdapterSaveError",
    "MergeCheck",
    "check_training",
    "__version__",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "inject_adapter_in_model",
    "BdLoraConfig",
    "CordaConfig",
    "EvaConfig",
    "KasaConfig",
    "Kind",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "LoraWarning",
    "MontecloraConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "VeloraConfig",
    "get_peft_model",
    "register_kind",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_corda",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "reduce_intruder_dimension",
    "replace_lora_weights_loftq",
    "LoraGAConfig",
    "preprocess_loraga",
    "ArrowConfig",
    "create_arrow_model",
]
