"""Silence the messages of dependencies that a user can do nothing about, and only those.

Installed on `import mft_trainer`, before any dependency logs (the filters attach to the loggers by
name, so they hold for loggers the libraries create later):

- bitsandbytes, on CPUs with AVX512-BF16, tries to fetch an optional kernel from the Hub at import
  and warns "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot; its own
  CPU kernel is used then, and 4-bit training works as it should.
- DeepSpeed warns "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
  to detect it" at import on every machine without CUDA. It prints to stdout, where it also corrupts
  the output of commands whose stdout is read (`scripts/convert_gguf.py` prints the checkpoint path).
- PEFT reads transformers' deprecated `is_gradient_checkpointing` in every `get_peft_model`, and
  calls `gradient_checkpointing_enable` for QLoRA (`prepare_model_for_kbit_training`): each raises a
  FutureWarning ("use is_activation_checkpointing") addressed to PEFT's authors.

Every other message of these loggers still shows. `MFT_SHOW_LIBRARY_NOISE=1` turns the filters off.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger name -> the beginnings of the messages to drop.
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "DeepSpeed": ("Setting accelerator to CPU.",),
}


class _DropMessages(logging.Filter):
    def __init__(self, beginnings: tuple[str, ...]):
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.beginnings)


def silence_library_noise() -> None:
    """Attach the filters of `KNOWN_NOISE` (once; a no-op with MFT_SHOW_LIBRARY_NOISE=1)."""
    if os.environ.get("MFT_SHOW_LIBRARY_NOISE") == "1":
        return
    for name in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
        warnings.filterwarnings("ignore", message=f"`{name}` is deprecated", category=FutureWarning)
    for name, beginnings in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(beginnings))
