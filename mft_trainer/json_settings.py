"""Settings that hold a list or a mapping also take it as JSON text, the form a command line gives.

`transformers.HfArgumentParser` gives every field one argparse type. A field annotated `X | str | None`
gets `str` (transformers declares its own dict fields so, e.g. `TrainingArguments.lr_scheduler_kwargs:
dict | str | None`), and the config's `__post_init__` turns the text into the list or mapping:

    python my_script.py --task_weights '{"code_qa": 2.0}' --data_paths '["data/code_qa", "data/chat"]'

The order matters to HfArgumentParser (it takes the second type of such a union), and `X | Y`
unions keep it, whereas `typing.Union` may hand back an equal union created earlier, in another order.
"""

from __future__ import annotations

import json
from typing import Any


def parse_json_text(name: str, value: Any) -> Any:
    """`value` parsed when it is the JSON text of a list or mapping (a string that starts with `[` or
    `{`); any other value as it is.

    >>> parse_json_text("task_weights", '{"code_qa": 2.0}')
    {'code_qa': 2.0}
    >>> parse_json_text("data_paths", "data/code_qa")
    'data/code_qa'

    Raises:
        ValueError: text that starts as a JSON list or mapping but is not valid JSON; the message names
            the setting.
    """
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{name}: {value!r} is not valid JSON ({e.msg}); write a list or mapping as JSON, e.g. "
            '\'["a", "b"]\' or \'{"a": 1}\''
        ) from None
