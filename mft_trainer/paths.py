"""Local paths that do not exist: an immediate error, not a hub lookup.

transformers takes a name that is not an existing directory for a Hugging Face Hub model id: a
mistyped local path then fails after the hub's retries (56 s and about 40 warnings for
`chat.py --model output/dmeo` without network), or with the hub's "Repo id must be in the form
'repo_name' or 'namespace/repo_name'". A name that cannot be a hub id, or whose first directory
exists here, is a local path, and it is checked before anything loads:

>>> check_local_path("output/dmeo", "model")                          # doctest: +SKIP
FileNotFoundError: model 'output/dmeo' does not exist (did you mean output/demo?)
>>> check_local_path("Qwen/Qwen2.5-Coder-1.5B", "model")  # a hub id: left to the hub   # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def looks_local(name: str | os.PathLike) -> bool:
    """True when `name` is meant as a local path: it cannot be a hub id ('name' or 'namespace/name':
    an absolute path, ./ or ../, ~, more than one /, a backslash), or its first component is a
    directory here (output/dmeo next to output/demo)."""
    text = str(name)
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def check_local_path(name: str | os.PathLike | None, what: str) -> None:
    """Raise FileNotFoundError when `name` looks like a local path (`looks_local`) and does not
    exist; `what` names it in the message ("model_name_or_path", "tokenizer", ...). Hub ids and
    existing paths pass."""
    if name is None or os.path.exists(name) or not looks_local(name):
        return
    raise FileNotFoundError(
        f"{what} {str(name)!r} does not exist{missing_path_hint(name)}; it is a local path, not a hub model id"
    )


def missing_path_hint(name: str | os.PathLike) -> str:
    """For a path that does not exist: ' (did you mean ...?)' with close names beside it, or the
    nearest existing directory above it; '' when there is neither."""
    path = Path(name).expanduser()
    parent = next((p for p in path.parents if p.is_dir()), None)
    if parent is not None and parent == path.parent:
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
        if close:
            return " (did you mean " + " or ".join(str(Path(str(name)).parent / c) for c in close) + "?)"
    elif parent is not None:
        return f" (the nearest existing directory is {parent})"
    return ""
