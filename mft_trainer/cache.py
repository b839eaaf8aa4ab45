"""The dataset cache (tokenized tasks, packed rows): damaged files are rebuilt, abandoned ones removed.

`datasets.map` reuses a cache file when it exists. A cache file that cannot be read in full (cut
short by a full disk, a copy or a crash) then fails with pyarrow's "OSError: Expected to be able
to read N bytes for message body", without the file's name. And `map` writes into a temporary file
(`tmpXXXXXXXX`) beside the cache file and renames it at the end: a process killed on the way
leaves that file behind for good. `cache_file_for` takes care of both before every `map`:

>>> cache_file_for(Path("~/.cache/mft_trainer"), "code_qa-0123abcd.arrow")        # doctest: +SKIP
WARNING ... the cache file .../code_qa-0123abcd.arrow cannot be read (Expected to be able to read 22104
bytes for message body, got 10316): removed, it is built again
'/root/.cache/mft_trainer/code_qa-0123abcd.arrow'
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger(__name__)

# tempfile.NamedTemporaryFile's names, as datasets.map creates them in the cache directory.
_TEMP_FILE_NAME = re.compile(r"^tmp[a-z0-9_]{8}$")
# A temporary file not written to for this long belongs to no running map (map writes a batch of
# rows at a time, so a live one changes every few seconds): it was left by a killed process.
ABANDONED_AFTER_SECONDS = 3600


def unreadable(path: Path) -> str | None:
    """Why the Arrow cache file `path` cannot be read in full, or None when it can (the read is
    memory-mapped: it touches the batches' headers, not their data)."""
    try:
        with pa.memory_map(str(path)) as source:
            pa.ipc.open_stream(source).read_all()
    except (OSError, pa.lib.ArrowException) as error:
        return str(error)
    return None


def remove_abandoned_temp_files(cache_dir: Path, older_than: float = ABANDONED_AFTER_SECONDS) -> list[Path]:
    """Remove the temporary files of `datasets.map` in `cache_dir` that have not been written to for
    `older_than` seconds (left by a killed tokenization); returns them."""
    now = time.time()
    removed = []
    for path in cache_dir.iterdir():
        if _TEMP_FILE_NAME.match(path.name) and path.is_file() and now - path.stat().st_mtime > older_than:
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed %s, a temporary cache file left by a process that was stopped while writing it", path)
    return removed


def safe_file_name(name: str) -> str:
    """`name` (a task name) as part of a file name: anything but letters, digits, - _ . becomes _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cache_file_for(cache_dir: Path | None, name: str) -> str | None:
    """The path of the cache file `name` in `cache_dir`, ready for `datasets.map(cache_file_name=...)`
    (None when caching is off): the directory exists, abandoned temporary files are removed, and a
    cached file (or one of its `num_proc` shards, `<name>_00000_of_00004.arrow`) that cannot be read
    is removed with a warning naming it, so that `map` builds it again."""
    if cache_dir is None:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_files(cache_dir)
    path = cache_dir / name
    for file in [path, *sorted(cache_dir.glob(f"{path.stem}_*_of_*{path.suffix}"))]:
        problem = unreadable(file) if file.is_file() else None
        if problem is not None:
            logger.warning("the cache file %s cannot be read (%s): removed, it is built again", file, problem)
            file.unlink(missing_ok=True)
    return str(path)
