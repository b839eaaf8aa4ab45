"""Process isolation: every row runs in a process of its own, so that its peak memory is its own
and a row that crashes, runs out of memory or hangs is reported instead of ending the run.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import time
import warnings
from dataclasses import asdict
from typing import Any

import datasets
import torch
import transformers

from benchmark_plan import LAYOUTS, Row, Settings, step_description
from benchmark_rows import run_row

# What the rows' server process imports once (a missing one is skipped).
PRELOAD_MODULES = ["torch", "datasets", "transformers.trainer", "mft_trainer", "trl.trainer.sft_trainer"]


def row_context(method: str) -> Any:
    """The multiprocessing context the rows run in.

    `forkserver` (default): rows start as forks of a server process that has imported the heavy
    modules once, so a row starts in a second rather than after a fresh import, with no CUDA state
    (the benchmark's process never touches CUDA; PYTORCH_NVML_BASED_CUDA_CHECK keeps `is_available()`
    from initialising it in the server). The server starts now and imports while the data is built.
    (Named modules, not "__main__": before Python 3.13 the forkserver ignores a "__main__" preload;
    each row re-runs the top level of benchmark.py, the command line, which is cheap once its imports
    are loaded.) Where an import initialises CUDA anyway (bitsandbytes does, when transformers imports
    it on a GPU machine), forked rows cannot use CUDA: benchmark.py's `run` sees the probe row fail and
    switches to `spawn`.
    `spawn`: a fresh interpreter per row (a full import each), the safe fallback.
    """
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD_MODULES)
        multiprocessing.forkserver.ensure_running()
    return context


def _row_process(row: Row, s: Settings, connection: Any) -> None:
    """Entry point of a row's process: run it and send the record back."""
    if s.cpu_threads:
        torch.set_num_threads(s.cpu_threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices, once per row otherwise
    datasets.disable_progress_bars()
    connection.send(run_row(row, s))
    connection.close()


def run_in_process(context: Any, row: Row, s: Settings, timeout_s: float) -> dict[str, Any]:
    """Run `row` in a process of its own (`row_context`); a crash, a kill or a timeout becomes the
    row's error."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_row_process, args=(row, s, sender))
    began = time.perf_counter()
    process.start()
    sender.close()
    record = None
    try:
        if receiver.poll(timeout_s):
            record = receiver.recv()
    except EOFError:  # the process died before sending anything
        pass
    if record is None and process.is_alive():
        process.kill()
        error = f"timed out after {timeout_s:.0f}s"
    else:
        error = None
    process.join(30)
    if process.is_alive():  # sent its record but does not exit: it must not share the device with the next row
        process.kill()
        process.join()
    if record is None:
        record = {"name": row.name, **asdict(row),
                  "error": error or f"the row's process died (exit code {process.exitcode}; -9 is a kill, e.g. "
                                    "out of host memory)",
                  "wall_s": time.perf_counter() - began}
        if row.kind == "train":
            record.update(group=LAYOUTS[row.layout]["group"], step=step_description(row, s))
    record["process_s"] = time.perf_counter() - began  # the row's process from start to exit
    return record
