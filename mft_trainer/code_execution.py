"""Running generated code against its tests: each program in a fresh interpreter, never in the caller.

A HumanEval-style problem carries `test` (code defining `check(candidate)`) and `entry_point` (the
function's name). The program is the code under test, then the test, then `check(entry_point)`; it
passes when it exits with status 0 within the time limit. Every program runs in a process of its own
(`python -I`, no site customisation), in an empty temporary directory, with an empty environment,
a memory and CPU-time limit, its standard input closed, and the network cut off inside it (the
socket module refuses to connect or resolve). It passes only if it reaches its end (a random marker
printed after the tests), so a program that exits early with status 0 fails. That is a guard against accidents, not a sandbox
against hostile code: run untrusted models' code on a machine you can lose.

>>> run_program("def f():\\n    return 1\\n", "def check(c):\\n    assert c() == 1\\n", "f").passed  # doctest: +SKIP
True
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Run before the program, inside its process: memory and CPU-time limits, and no network (a
# connection or a name lookup raises). Set there rather than by the parent (a preexec_fn is unsafe
# in a multi-threaded parent, such as a training process).
_GUARD = '''
import resource as _resource
_resource.setrlimit(_resource.RLIMIT_AS, ({memory}, {memory}))
_resource.setrlimit(_resource.RLIMIT_CPU, ({cpu}, {cpu} + 1))
del _resource
import socket as _socket
def _refuse(*args, **kwargs):
    raise OSError("network access is disabled while testing generated code")
for _name in ("socket", "create_connection", "getaddrinfo", "gethostbyname", "create_server"):
    setattr(_socket, _name, _refuse)
del _socket, _refuse, _name
'''


@dataclass(frozen=True)
class ProgramResult:
    """`passed`, and why not: "passed", "failed: <last line of stderr>", "timed out"."""

    passed: bool
    result: str


def run_program(
    code: str, test: str, entry_point: str, timeout_s: float = 10.0, memory_mb: int = 1024
) -> ProgramResult:
    """Run `code` + `test` + `check(entry_point)` in a fresh interpreter; see the module docstring."""
    guard = _GUARD.format(memory=memory_mb * 2**20, cpu=int(timeout_s) + 1)
    # Passing means reaching the end: a program that exits early (sys.exit(0)) never prints the marker.
    marker = f"mft-tests-passed-{secrets.token_hex(8)}"
    program = guard + "\n" + code + "\n\n" + test + "\n\n" + f"check({entry_point})\nprint({marker!r})\n"
    with tempfile.TemporaryDirectory(prefix="mft_code_") as workdir:
        # Its own session (process group), so that a timeout kills whatever it started too.
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", program], cwd=workdir, env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return ProgramResult(False, "timed out")
    if process.returncode == 0 and stdout.rstrip().endswith(marker):
        return ProgramResult(True, "passed")
    if process.returncode == 0:
        return ProgramResult(False, "failed: exited before its tests ended")
    last = (stderr.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
    return ProgramResult(False, f"failed: {last[:200]}")


def run_programs(
    problems: Sequence[tuple[str, str, str]], timeout_s: float = 10.0, workers: int = 2
) -> list[ProgramResult]:
    """`run_program` for many (code, test, entry_point), `workers` at a time, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(*p, timeout_s=timeout_s), problems))
