"""`from mft_trainer import ...`: what a user's script or notebook imports, and nothing low-level."""

import mft_trainer

# What the README, the notebook and the docs import from the package.
USER_FACING = {
    "MFTTrainer", "MFTConfig", "DataConfig", "ModelConfig", "build_mft_dataset", "load_model", "load_tokenizer",
    "DataCollatorForMFT", "TaskRegistry", "MFTDataset",
    "ChatSession", "GenerationOptions", "generate_answers", "load_model_and_tokenizer",
    "build_inference_prompt", "render_conversation", "get_prompt_format", "install_chat_template",
    "LossMode", "LossImplementation", "CoBaValidSampling", "PaddingMode", "OverlengthPolicy", "EmptyAnswers",
    "DataValidationError", "ChatTemplateError", "PackingError", "CheckpointSaveError", "IncompleteCheckpointError",
    "NonFiniteError", "NonFiniteLossError", "NonFiniteGradientError", "NonFiniteWeightsError",
}
# Imported from their modules (mft_trainer.chunked_loss, mft_trainer.attention, mft_trainer.losses).
LOW_LEVEL = {"linear_cross_entropy", "OutputHeadLoss", "probe_packing", "reduce_loss", "per_token_cross_entropy"}


def test_every_public_name_imports():
    namespace: dict = {}
    exec("from mft_trainer import *", namespace)
    assert set(mft_trainer.__all__) <= set(namespace)
    assert mft_trainer.__all__ == sorted(set(mft_trainer.__all__))  # sorted, each once


def test_the_user_facing_names_are_public():
    assert USER_FACING <= set(mft_trainer.__all__), USER_FACING - set(mft_trainer.__all__)


def test_low_level_kernels_stay_in_their_modules():
    from mft_trainer.packing_guard import probe_packing
    from mft_trainer.chunked_loss import OutputHeadLoss, linear_cross_entropy
    from mft_trainer.losses import per_token_cross_entropy, reduce_loss

    assert all(callable(f) for f in (probe_packing, OutputHeadLoss, linear_cross_entropy, per_token_cross_entropy,
                                     reduce_loss))
    assert not LOW_LEVEL & set(mft_trainer.__all__)
