"""The terminal mode of `scripts/chat.py`: one question per line, answered with the history so far.

An answer with nothing to read (empty, or only whitespace, which would print as blank lines) is
shown as one line that says so; the batch mode writes the answer's real text.

>>> run_interactive(ChatSession(model, tok), sys.stdin, sys.stdout, prompt_prefix="user> ")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from .generation import ChatSession, Generation

CHAT_COMMANDS = {
    "/reset": "forget the conversation (keeps the system prompt)",
    "/exit": "quit (also /quit, or end of input)",
    "/help": "show these commands",
}


def shown_answer(generation: Generation) -> str:
    """An answer as the terminal shows it: its text, or one line saying that it is empty.

    >>> shown_answer(Generation(text="", token_ids=[50256], stopped_at_eos=True))
    '(empty answer: the model ended its turn at once)'
    >>> shown_answer(Generation(text="\\n\\n", token_ids=[628], stopped_at_eos=False))
    '(empty answer: 2 whitespace character(s))'
    """
    text = generation.text
    if text.strip():
        return text
    if text:
        return f"(empty answer: {len(text)} whitespace character(s))"
    if generation.stopped_at_eos:
        return "(empty answer: the model ended its turn at once)"
    return "(empty answer: the generated tokens decode to no text)"


def run_interactive(
    session: ChatSession,
    lines: Iterable[str],
    out: TextIO,
    show_prompt: TextIO | None = None,
    prompt_prefix: str = "",
    echo: bool = False,
) -> None:
    """Chat line by line: each input line is a user turn, answered with the history so far.

    Args:
        session: the conversation.
        lines: the input, one question or command per line (e.g. `sys.stdin`).
        out: where answers go (an empty one as a line that says so: `shown_answer`).
        show_prompt: if given, each full prompt text is written there (as a JSON string) first,
            to see exactly what the model is given.
        prompt_prefix: written to `out` before each input line is read (e.g. "user> " on a terminal).
        echo: write each question (`user> ...`) and answer (`model> ...`) as a transcript, for input
            that is not typed at a terminal.
    """
    out.write(prompt_prefix)
    out.flush()
    for raw in lines:
        line = raw.rstrip("\r\n")
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif command == "/help":
            out.write("".join(f"{name:8} {what}\n" for name, what in CHAT_COMMANDS.items()))
        elif command:
            if show_prompt is not None:
                show_prompt.write(f"prompt: {json.dumps(session.prompt(line).text)}\n")
                show_prompt.flush()
            if echo:
                out.write(f"user> {line}\n")
            generation = session.ask(line)
            cut = "" if generation.stopped_at_eos else " [cut short: max_new_tokens reached]"
            out.write(f"{'model> ' if echo else ''}{shown_answer(generation)}{cut}\n\n")
        out.write(prompt_prefix)
        out.flush()
