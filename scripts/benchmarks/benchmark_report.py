"""The report of a run: the markdown tables (training rows with their ratio to TRL's best, the
comparisons the issue asks for, data preparation), the bar chart, and the results JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmark_plan import GROUP_CONVERSATIONS


def training_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rows, the conversations group first (plan order within a group)."""
    train = [r for r in records if r.get("kind") == "train"]
    return sorted(train, key=lambda r: r.get("group") != GROUP_CONVERSATIONS)


def is_baseline(record: dict[str, Any]) -> bool:
    """The MFTCoder-style row: padding, full logits (MFTCoder's loss), sdpa."""
    return record.get("trainer") == "mft" and record.get("layout") == "padding" and record.get("loss") == "plain"


def fastest(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The successful training row with the most real tokens/s among those whose fields equal `match`."""
    ok = [r for r in records if r.get("kind") == "train" and "error" not in r
          and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r["real_tokens_per_s"], default=None)


def trl_best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """TRL's fastest row: its best setting (packing bfd + padding-free is fixed; the backend is the choice)."""
    return fastest(records, trainer="trl")


def _fmt(value: Any, digits: int = 0) -> str:
    """A table cell: a number with thousands separators and `digits` decimals, `-` for None."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _peak(record: dict[str, Any] | None) -> str:
    """A row's peak GPU memory in GB, or `-`."""
    return f"{record['peak_gb']:.1f} GB" if record and record.get("peak_gb") is not None else "-"


def comparisons(records: list[dict[str, Any]]) -> list[str]:
    """The issue's comparisons, one line each: our best vs TRL's best (speed, memory), vs the
    MFTCoder-style baseline, and the same conversations per step; CoBa's cost per step."""
    lines = []
    ours = fastest(records, trainer="mft", loss_mode="case3")
    trl_row, baseline = trl_best(records), next((r for r in records if is_baseline(r) and "error" not in r), None)
    same_conversations = fastest(records, trainer="mft", layout="padding_free_samples")
    if ours and trl_row:
        lines.append(f"- MFTTrainer's best row (`{ours['name']}`) vs TRL's best (`{trl_row['name']}`): "
                     f"{ours['real_tokens_per_s'] / trl_row['real_tokens_per_s']:.2f}x real tokens/s; peak memory "
                     f"{_peak(ours)} vs {_peak(trl_row)}.")
    if ours and baseline:
        lines.append(f"- MFTTrainer's best row vs MFTCoder-style padding (`{baseline['name']}`): "
                     f"{ours['real_tokens_per_s'] / baseline['real_tokens_per_s']:.2f}x real tokens/s.")
    if same_conversations and baseline:
        lines.append(f"- The same {baseline['step'].split(' ')[0]} conversations per step in one padding-free row "
                     f"(`{same_conversations['name']}`) vs padded: "
                     f"{same_conversations['real_tokens_per_s'] / baseline['real_tokens_per_s']:.2f}x real tokens/s "
                     f"({baseline['real_tokens_per_step'] / baseline['padded_tokens_per_step']:.0%} of the padded "
                     "batches' tokens are real).")
    if ours and ours.get("mfu") is not None:
        lines.append(f"- MFU of MFTTrainer's best row: {100 * ours['mfu']:.1f}% (gradient checkpointing "
                     f"{'on' if ours['gradient_checkpointing'] else 'off'}).")
    coba = fastest(records, trainer="mft", loss_mode="coba")
    base = coba and fastest(records, trainer="mft", loss_mode="case3", layout=coba["layout"], backend=coba["backend"],
                            loss=coba["loss"])
    if coba and base:
        extra = coba["seconds_per_step"] - base["seconds_per_step"]
        lines.append(f"- CoBa: {coba['seconds_per_step'] * 1000:,.0f} ms per step vs {base['seconds_per_step'] * 1000:,.0f}"
                     f" ms for the same row in case3: {extra * 1000:+,.0f} ms ({extra / base['seconds_per_step']:+.0%}) "
                     "per step (a validation batch, forward only, after every step).")
    return lines


def markdown_tables(result: dict[str, Any]) -> str:
    """The training table (with ratios to TRL's best row), the comparisons and the data preparation table."""
    records = result["rows"]
    on_cuda = result.get("environment", {}).get("device_type") == "cuda"
    best = trl_best(records)
    header = ["row", "step holds", "real tokens/step", "tokens/step (padded)", "real tokens/s", "x TRL best",
              "MFU" if on_cuda else "MFU (GPU only)", "peak GB" if on_cuda else "peak GB (GPU only)", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in training_records(records):
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('step', '')} | {r['error'][:160]} |" + " |" * (len(header) - 3))
            continue
        ratio = r["real_tokens_per_s"] / best["real_tokens_per_s"] if best else None
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['step']} | {_fmt(r['real_tokens_per_step'])} | {_fmt(r['padded_tokens_per_step'])} | "
            f"{_fmt(r['real_tokens_per_s'])} | {_fmt(ratio, 2)} | {mfu} | {peak} | {_fmt(r['final_loss'], 3)} |"
        )
    text = ["\n".join(lines), "\n".join(comparisons(records))]
    prep = [r for r in records if r.get("kind") == "prep"]
    if prep:
        rows = ["| data preparation | seconds | conversations | packed rows | tokens | trained tokens | what is timed |",
                "|---|---|---|---|---|---|---|"]
        for r in prep:
            if "error" in r:
                rows.append(f"| {r['name']} | {r['error'][:160]} | | | | | |")
            else:
                rows.append(f"| {r['name']} | {r['seconds']:.1f} | {_fmt(r['conversations'])} | {_fmt(r['rows'])} | "
                            f"{_fmt(r['tokens'])} | {_fmt(r['trained_tokens'])} | {r['what']} |")
        text.append("\n".join(rows))
    return "\n\n".join(t for t in text if t)


def plot(result: dict[str, Any], path: str) -> None:
    """A horizontal bar chart of real tokens/s per training row, annotated with the ratio to TRL's best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in training_records(result["rows"]) if "error" not in r]
    best = trl_best(records)
    colors = {"trl": "tab:orange", "mft": "tab:blue"}
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(records) + 1.2))
    names = [r["name"] for r in records][::-1]
    values = [r["real_tokens_per_s"] for r in records][::-1]
    bar_colors = [("tab:gray" if is_baseline(r) else colors[r["trainer"]]) for r in records][::-1]
    axes.barh(names, values, color=bar_colors)
    for y, value in enumerate(values):
        label = f" {value:,.0f}" + (f" ({value / best['real_tokens_per_s']:.2f}x TRL)" if best else "")
        axes.text(value, y, label, va="center", fontsize=7)
    env = result.get("environment", {})
    axes.set_xlabel("real (non-padding) tokens per second")
    axes.set_title(f"{Path(result['settings']['model']).name} on {env.get('device', '?')}: gray = MFTCoder-style padding, "
                   "blue = MFTTrainer, orange = TRL", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.set_xlim(0, max(values, default=1) * 1.35)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_results(result: dict[str, Any], path: str | None) -> None:
    """Write the results JSON to `path` (`--out`), if any; the run calls it after every row."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str))


def report(result: dict[str, Any], table_path: str | None, chart_path: str | None) -> None:
    """Print the tables; write them to `table_path` (`--table`) and the chart to `chart_path` (`--plot`), if any."""
    tables = markdown_tables(result)
    print(tables)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(tables + "\n")
    if chart_path:
        try:
            plot(result, chart_path)
        except ImportError:
            print("no chart: matplotlib is not installed (pip install matplotlib); rerun with --from_results")

