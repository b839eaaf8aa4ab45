"""mft-trainer: multi-task fine-tuning of causal language models on Hugging Face `transformers.Trainer`.

>>> from mft_trainer import DataConfig, MFTConfig, MFTTrainer, ModelConfig
>>> from mft_trainer import build_mft_dataset, load_model, load_tokenizer
>>> model_config = ModelConfig(model_name_or_path="Qwen/Qwen2.5-Coder-1.5B", peft_type="lora")
>>> tokenizer = load_tokenizer(model_config)                                              # doctest: +SKIP
>>> data = build_mft_dataset(DataConfig(data_paths=["examples/data/code_qa"]), tokenizer)   # doctest: +SKIP
>>> trainer = MFTTrainer(model=load_model(model_config), args=MFTConfig(output_dir="out"),  # doctest: +SKIP
...                      train_dataset=data.train, eval_dataset=data.valid, processing_class=tokenizer,
...                      tasks=data.tasks)

MFTTrainer collates with `data.collator(pad_token_id)`; a loop of your own can too, with the pad id
the trainer uses (the tokenizer's pad token, else its EOS token):

>>> from mft_trainer.segments import padding_token_id
>>> collator = data.collator(pad_token_id=padding_token_id(tokenizer))                     # doctest: +SKIP

Low-level pieces are imported from their modules: `mft_trainer.losses` (the loss reductions),
`mft_trainer.chunked_loss` (`linear_cross_entropy`, `OutputHeadLoss`), `mft_trainer.attention`
(the `torch_varlen` backend), `mft_trainer.packing_guard` (`probe_packing`), `mft_trainer.packing`.
"""

from .library_noise import silence_library_noise

silence_library_noise()  # before the imports below load bitsandbytes and DeepSpeed

from .attention import (
    PackingError,
    default_attn_implementation,
)
from .chat_template import (
    build_chat_template,
    install_chat_template,
)
from .checkpoints import (
    CheckpointSaveError,
    IncompleteCheckpointError,
    last_complete_checkpoint,
)
from .coba import (
    CoBaBalancer,
)
from .collator import (
    DataCollatorForMFT,
)
from .config import (
    MFTConfig,
)
from .data_config import (
    DataConfig,
)
from .dataset import (
    MFTDataset,
    build_mft_dataset,
)
from .divergence import (
    NonFiniteError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteWeightsError,
)
from .formats import (
    InputFormat,
    parse_record,
)
from .generation import (
    ChatSession,
    Generation,
    GenerationOptions,
    generate_answers,
)
from .model_loading import (
    load_model_and_tokenizer,
)
from .model_config import (
    ModelConfig,
)
from .modeling import (
    load_model,
    load_tokenizer,
)
from .modes import (
    CoBaValidSampling,
    EmptyAnswers,
    LossImplementation,
    LossMode,
    OverlengthPolicy,
    PaddingMode,
)
from .packing_guard import (
    check_packing_support,
)
from .prompt_format import (
    ChatTemplateError,
    ChatTemplateMode,
    build_inference_prompt,
    get_prompt_format,
    render_conversation,
)
from .records import (
    DataValidationError,
    InvalidRecord,
    Problem,
    RecordError,
)
from .rendering import (
    RoleMarkers,
)
from .segments import (
    InferencePrompt,
    PromptFormat,
)
from .summary import (
    DatasetSummary,
    PackingSummary,
    TaskSummary,
)
from .tasks import (
    TaskRegistry,
    resolve_task_sources,
)
from .trainer import (
    MFTTrainer,
)

__version__ = "0.1.0"

__all__ = [
    "ChatSession",
    "ChatTemplateError",
    "ChatTemplateMode",
    "CheckpointSaveError",
    "CoBaBalancer",
    "CoBaValidSampling",
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
    "ModelConfig",
    "NonFiniteError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "OverlengthPolicy",
    "PackingError",
    "PackingSummary",
    "PaddingMode",
    "Problem",
    "PromptFormat",
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
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "parse_record",
    "render_conversation",
    "resolve_task_sources",
]
