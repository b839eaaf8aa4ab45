"""The command-line programs. Each module's `main(argv=None) -> int` is a console script of setup.py
and the body of the script of the same name in scripts/ (which a checkout runs without installing):

    mft-train          mft_trainer.cli.train          scripts/train.py
    mft-chat           mft_trainer.cli.chat           scripts/chat.py
    mft-prepare-data   mft_trainer.cli.prepare_data   scripts/prepare_data.py
    mft-merge          mft_trainer.cli.merge_lora     scripts/merge_lora.py
    mft-convert-gguf   mft_trainer.cli.convert_gguf   scripts/convert_gguf.py
"""
