"""mft-trainer: multi-task fine-tuning of causal language models on Hugging Face `transformers.Trainer`.

>>> from mft_trainer import DataConfig, build_mft_dataset, DataCollatorForMFT     # doctest: +SKIP
>>> data = build_mft_dataset(DataConfig(data_paths=["examples/data/code_qa"]), tokenizer)
>>> collator = DataCollatorForMFT(pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
"""

from .library_noise import silence_library_noise

silence_library_noise()  # before the imports below load bitsandbytes and DeepSpeed

from .attention import PackingError, check_packing_support, default_attn_implementation, probe_packing
from .chat_template import build_chat_template, install_chat_template
from .chunked_loss import OutputHeadLoss, linear_cross_entropy
from .coba import CoBaBalancer
from .collator import DataCollatorForMFT
from .config import MFTConfig
from .data_config import DataConfig
from .dataset import MFTDataset, build_mft_dataset
from .generation import ChatSession, Generation, GenerationOptions, generate_answers
from .model_loading import load_model_and_tokenizer
from .modes import EmptyAnswers, LossImplementation, LossMode, OverlengthPolicy, PaddingMode
from .formats import InputFormat, parse_record
from .records import DataValidationError, InvalidRecord, Problem, RecordError
from .prompt_format import ChatTemplateError, ChatTemplateMode, build_inference_prompt, get_prompt_format, render_conversation
from .rendering import RoleMarkers
from .segments import InferencePrompt, PromptFormat
from .summary import DatasetSummary, PackingSummary, TaskSummary
from .tasks import TaskRegistry, resolve_task_sources
from .checkpoints import CheckpointSaveError, IncompleteCheckpointError, last_complete_checkpoint
from .divergence import NonFiniteError, NonFiniteGradientError, NonFiniteLossError, NonFiniteWeightsError
from .trainer import MFTTrainer

__version__ = "0.1.0"

__all__ = [
    "OutputHeadLoss",
    "linear_cross_entropy",
    "ChatSession",
    "ChatTemplateError",
    "ChatTemplateMode",
    "CheckpointSaveError",
    "CoBaBalancer",
    "DataCollatorForMFT",
    "DataConfig",
    "DataValidationError",
    "DatasetSummary",
    "EmptyAnswers",
    "Generation",
    "GenerationOptions",
    "IncompleteCheckpointError",
    "InferencePrompt",
    "InputFormat",
    "InvalidRecord",
    "LossImplementation",
    "LossMode",
    "MFTConfig",
    "MFTDataset",
    "MFTTrainer",
    "NonFiniteError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "OverlengthPolicy",
    "PackingError",
    "PackingSummary",
    "PaddingMode",
    "PromptFormat",
    "Problem",
    "RecordError",
    "RoleMarkers",
    "TaskRegistry",
    "TaskSummary",
    "build_chat_template",
    "build_inference_prompt",
    "build_mft_dataset",
    "check_packing_support",
    "default_attn_implementation",
    "generate_answers",
    "get_prompt_format",
    "install_chat_template",
    "last_complete_checkpoint",
    "load_model_and_tokenizer",
    "parse_record",
    "probe_packing",
    "render_conversation",
    "resolve_task_sources",
]
