"""The benchmark's plan: what a row is, the settings every row shares, and which rows a run holds.

A row is one measurement (a trainer x batch layout x attention backend x loss implementation
training run, a data preparation timing, or the probe of the machine). `plan_rows` orders every row
of a full run, most important first; `select_rows` applies `--only` / `--skip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mft_trainer.attention import TORCH_VARLEN

# Model shapes (random weights). N counts each parameter once: the tied embedding is the output layer's matmul.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # hidden 64, 2 layers; vocab_size is the tokenizer's (set in benchmark_rows.build_model)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=32768),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=32768),
}

# Layouts: how the same tokenized samples become the batches of one optimizer step.
GROUP_CONVERSATIONS = "conversations"  # the same conversations in every step
GROUP_TOKENS = "tokens"  # the same real tokens in every step
LAYOUTS: dict[str, dict[str, str]] = {
    # name: (data: samples | rows, DataCollatorForMFT padding_mode, group)
    "padding": dict(data="samples", collator="padding", group=GROUP_CONVERSATIONS),
    "padding_free_samples": dict(data="samples", collator="padding_free", group=GROUP_CONVERSATIONS),
    "pack": dict(data="rows", collator="pack", group=GROUP_TOKENS),
    "padding_free": dict(data="rows", collator="padding_free", group=GROUP_TOKENS),
    # TRL: our packed rows through its padding-free collator; or its own bfd packing of the samples
    "rows": dict(data="rows", collator="trl", group=GROUP_TOKENS),
    "bfd": dict(data="samples", collator="trl", group=GROUP_TOKENS),
}
TRL_LOSS = "fused"  # TRL 1.16's own loss: a chunked ("fused") output layer that never builds full logits


@dataclass(frozen=True)
class Row:
    """One measurement. kind: `train` (trainer x layout x backend x loss), `prep` (data preparation
    of `trainer`), or `probe` (the environment: device, versions, available kernels)."""

    kind: str
    trainer: str = ""  # mft | trl
    layout: str = ""  # a LAYOUTS key
    backend: str = ""  # attn_implementation
    loss: str = ""  # mft: plain | chunked; trl: fused
    loss_mode: str = "case3"  # coba for the CoBa row (mft)

    @property
    def name(self) -> str:
        """What `--only` / `--skip` match and the tables show, e.g. `mft pack sdpa plain coba`."""
        if self.kind != "train":
            return f"{self.kind} {self.trainer}".strip()
        suffix = "" if self.loss_mode == "case3" else f" {self.loss_mode}"
        return f"{self.trainer} {self.layout} {self.backend} {self.loss}{suffix}"


@dataclass
class Settings:
    """The run's shared settings, the same for every row."""

    data: str
    tokenizer: str
    workdir: str
    model: str
    seq_length: int
    rows: int
    conversations: int
    pad_micro_batch: int
    steps: int
    warmup: int
    gradient_checkpointing: bool
    learning_rate: float
    data_split: str
    seed: int
    peak_tflops: float
    cpu_threads: int | None = None

    @property
    def max_steps(self) -> int:
        """Optimizer steps per training row: warmup, then the timed steps."""
        return self.warmup + self.steps


def plan_rows(env: dict[str, Any], backends: list[str]) -> list[Row]:
    """Every row of a full run, most important first (so that `--budget_s` cuts the least useful).

    First the rows the targets compare (our best layout, TRL's best, the MFTCoder-style baseline and
    the same conversations padding-free), then the chunked loss, TRL's own packing and CoBa, then
    flex_attention's pack row with TRL beside it (it may be the fastest kernel, but compiles), the
    sdpa rows, data preparation, and the remaining flex_attention rows.
    """
    on_cuda = env["device_type"] == "cuda"
    available = [b for b in backends if b != "flex_attention" or on_cuda]
    available = [b for b in available if b != "flash_attention_2" or env["flash_attention_2"]]
    # The packed rows' main backend: a varlen kernel on CUDA; on a CPU sdpa (torch_varlen's CPU path
    # is an exact reference, not a fast kernel).
    preferred = ["flash_attention_2", TORCH_VARLEN] if on_cuda else ["sdpa"]
    main = next((b for b in preferred + available if b in available), None)
    if main is None:
        raise ValueError(f"none of the backends {backends} can run here")
    losses = ["plain", "chunked"]

    def packed_rows(backend: str) -> list[Row]:
        """Our two packed layouts in each loss implementation, and TRL on the same rows."""
        return [Row("train", "mft", layout, backend, loss) for layout in ("pack", "padding_free") for loss in losses] + [
            Row("train", "trl", "rows", backend, TRL_LOSS)
        ]

    rows = [
        Row("train", "mft", "pack", main, "plain"),
        Row("train", "trl", "rows", main, TRL_LOSS),
        Row("train", "mft", "padding", "sdpa", "plain"),
        Row("train", "mft", "padding_free_samples", main, "plain"),
        Row("train", "mft", "padding_free", main, "plain"),
    ]
    rows += [Row("train", "mft", layout, main if layout != "padding" else "sdpa", "chunked")
             for layout in ("pack", "padding_free", "padding", "padding_free_samples")]
    rows += [Row("train", "trl", "bfd", main, TRL_LOSS), Row("train", "mft", "pack", main, "plain", "coba")]
    later = []
    for backend in sorted((b for b in available if b != main), key=lambda b: b != "flex_attention"):
        if backend == "flex_attention":
            first = [Row("train", "mft", "pack", backend, "plain"), Row("train", "trl", "rows", backend, TRL_LOSS)]
            rows += first
            later += [r for r in packed_rows(backend) if r not in first]
        else:
            rows += packed_rows(backend)
    return rows + [Row("prep", "mft"), Row("prep", "trl")] + later


def select_rows(rows: list[Row], only: str | None, skip: str | None) -> list[Row]:
    """The rows whose name contains one of the comma-separated `only` parts and none of `skip`'s."""

    def parts(text: str | None) -> list[str]:
        return [p.strip() for p in (text or "").split(",") if p.strip()]

    wanted, unwanted = parts(only), parts(skip)
    return [
        r for r in rows
        if (not wanted or any(w in r.name for w in wanted)) and not any(u in r.name for u in unwanted)
    ]


def step_description(row: Row, s: Settings) -> str:
    """What one optimizer step of `row` holds, for the table."""
    micro = s.pad_micro_batch
    return {
        "padding": f"{s.conversations} conversations: {s.conversations // micro} micro-batches of {micro}, "
                   "each padded to its longest",
        "padding_free_samples": f"the same {s.conversations} conversations in one row",
        "pack": f"{s.rows} best-fit rows of <= {s.seq_length}",
        "padding_free": f"the same {s.rows} rows joined in one row",
        "rows": f"the same {s.rows} rows, TRL's padding-free collator (one row)",
        "bfd": f"{s.rows} rows of TRL's own bfd packing (max_length {s.seq_length}), one row",
    }[row.layout]
