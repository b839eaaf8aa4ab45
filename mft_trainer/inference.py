"""Chat and batch inference with a fine-tuned model, prompted exactly as in training (invariant 5).

Prompts are built by the run's prompt format (`chat_template`: MFTCoder's markers, the model's own
template or a template file), the renderer used for training, and passed to `model.generate` as
token ids, so the model sees the training tokens and nothing else. Generation stops at the
end-of-turn token that ends every trained answer (the EOS in MFTCoder's format, `<|im_end|>`,
`<|eot_id|>`, ... in a template); the answer text excludes the prompt, that token and what the format
writes before it (MFTCoder's newline), so that it can go back into the history as the assistant's
content and render to the same bytes the model produced.

- `load_model_and_tokenizer`: a full model directory, or a LoRA adapter directory (its base model is
  loaded first, then the adapter with peft).
- `generate_answers`: answers for many conversations, in batches (left-padded; the tokenizer needs
  no pad token).
- `ChatSession`: a multi-round conversation that keeps its history.
- `run_batch` / `run_interactive`: the jsonl -> jsonl and the terminal modes of `scripts/chat.py`.

>>> model, tokenizer = load_model_and_tokenizer("output/run1")                    # doctest: +SKIP
>>> chat = ChatSession(model, tokenizer, GenerationOptions(max_new_tokens=256))   # doctest: +SKIP
>>> chat.ask("Write a Python function that reverses a string.").text              # doctest: +SKIP
'def reverse(s):\\n    return s[::-1]'
>>> chat.ask("Now in C.").text  # the first round is part of this prompt          # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .paths import check_local_path
from .formats import decode_json, prompt_messages
from .sources import SourceKind, iter_json_texts
from .run_artifacts import has_generation_config, read_run_config
from .records import InvalidRecord, Problem, RecordError
from .gguf_conversion import converted_gguf_checkpoint, is_gguf_path
from .prompt_format import ChatTemplateMode, build_inference_prompt, get_prompt_format
from .rendering import RoleMarkers
from .segments import InferencePrompt, PromptFormat, padding_token_id

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")



# --------------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """`"auto"` (the checkpoint's dtype), a torch dtype, or its name: float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}") from None


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a peft adapter (`adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(adapter_path: str | os.PathLike) -> str:
    """The base model recorded in an adapter's `adapter_config.json` (`base_model_name_or_path`)."""
    config = json.loads((Path(adapter_path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{Path(adapter_path) / ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
            "pass the base model's path explicitly"
        )
    return base


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def load_model_and_tokenizer(
    model_path: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a model for generation: a full model directory, or a LoRA adapter directory.

    An adapter directory (one with `adapter_config.json`) is loaded onto its base model with peft;
    the base is `base_model`, or the `base_model_name_or_path` the adapter recorded. The tokenizer is
    the adapter directory's when it has one (training saves it there, with the chat template), else
    the base model's. If training added tokens, the base's embeddings are resized to the tokenizer
    before the adapter is loaded. QLoRA adapters load onto the unquantized base in `dtype`.

    Args:
        model_path: a model directory (or hub name) or an adapter directory.
        base_model: the base of an adapter, overriding the one it recorded.
        dtype: "auto" (the checkpoint's dtype), "float32", "bfloat16" or "float16".
        device: where to run (default: "cuda" when available, else "cpu").
        trust_remote_code: allow model code from the checkpoint (off unless you trust it).

    Returns:
        (model, tokenizer), the model in eval mode on `device`.

    Raises:
        FileNotFoundError: a local model path (or the adapter's base) that does not exist, before
            anything is loaded or looked up on the hub.

    >>> model, tok = load_model_and_tokenizer("output/run1", dtype="bfloat16")      # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local_path(model_path, "model")
    if is_gguf_path(model_path):
        model_path = converted_gguf_checkpoint(model_path)
    adapter = is_adapter_dir(model_path)
    if base_model is not None and not adapter:
        raise ValueError(f"base_model was given but {model_path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    weights_path = (base_model or adapter_base_model(model_path)) if adapter else model_path
    if adapter:
        what = "base model" if base_model is not None else f"base model (recorded in {Path(model_path) / ADAPTER_CONFIG})"
        check_local_path(weights_path, what)
    tokenizer_path = weights_path if adapter and not _has_tokenizer(model_path) else model_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(weights_path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if adapter:
        from peft import PeftModel

        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            # Training added tokens and saved the resized embeddings with the adapter.
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(model_path))
        if has_generation_config(model_path):
            # Training saves the generation config beside the adapter: it stops at the trained end of turn.
            from transformers import GenerationConfig

            model.base_model.model.generation_config = GenerationConfig.from_pretrained(str(model_path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return model, tokenizer


def saved_prompt_format(
    model_dir: str | os.PathLike,
    tokenizer: Any,
    chat_template: str | None = None,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> PromptFormat:
    """The prompt format a saved run was trained in, for its saved tokenizer.

    The run's `run_config.yaml` (written by scripts/train.py) gives `chat_template`, `role_markers`
    and `eos_token`; arguments that are not None override it. A template mode (`model` or a
    .jinja file) means the saved tokenizer's own template, which training kept or installed. Without
    a run config, a tokenizer whose template is MFTCoder's (or that has none) means `mftcoder`,
    any other template `model` (a base model is prompted in its own template); but an adapter
    directory without a tokenizer of its own means the default, `mftcoder`, since its base model's
    template says nothing of how the adapter was trained.

    >>> model, tok = load_model_and_tokenizer("output/run1")                        # doctest: +SKIP
    >>> saved_prompt_format("output/run1", tok).name                                # doctest: +SKIP
    "the tokenizer's chat template"
    """
    from .chat_template import is_mft_chat_template

    settings = read_run_config(model_dir).get("data") or {}
    mode = chat_template or settings.get("chat_template")
    if mode is None and is_adapter_dir(model_dir) and not _has_tokenizer(model_dir):
        mode = ChatTemplateMode.MFTCODER.value
    if mode is None:
        template = getattr(tokenizer, "chat_template", None)
        mode = ChatTemplateMode.MFTCODER.value if not template or is_mft_chat_template(template) else "model"
    if mode != ChatTemplateMode.MFTCODER.value:
        mode = ChatTemplateMode.MODEL.value  # the saved tokenizer carries the template training used
        return get_prompt_format(tokenizer, mode, eos_token=eos_token or settings.get("eos_token"))
    markers = role_markers if role_markers is not None else settings.get("role_markers")
    return get_prompt_format(tokenizer, mode, markers, eos_token or settings.get("eos_token"))


# --------------------------------------------------------------------------------------------------
# Generation


# The values of the sampling options that leave the distribution as the model gives it.
_SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass
class GenerationOptions:
    """How to decode. Greedy by default; `do_sample=True` samples with `temperature`/`top_p`/`top_k`;
    `num_beams > 1` is beam search (with or without sampling).

    >>> GenerationOptions(max_new_tokens=128, do_sample=True, temperature=0.2, top_p=0.95)  # doctest: +SKIP
    """

    max_new_tokens: int = field(default=512, metadata={"help": "most tokens to generate per answer"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy/beam decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling probability mass (with do_sample)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens, 0 = all (with do_sample)"})
    num_beams: int = field(default=1, metadata={"help": "beam search with this many beams (1 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty for repeated tokens (1.0 = off)"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (greedy decoding is do_sample=False)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        sampling_set = [name for name, off in _SAMPLING_OFF.items() if getattr(self, name) != off]
        if sampling_set and not self.do_sample:
            # Without this, setting a temperature would silently decode greedily.
            raise ValueError(
                f"{', '.join(sampling_set)} set but sampling is off: set do_sample=True (--do_sample), "
                "or leave the sampling options at their defaults for greedy or beam decoding"
            )

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> Any:
        """A `transformers.GenerationConfig` with these options, stopping at `eos_token_id` only."""
        from transformers import GenerationConfig

        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            # The trained answers end with this EOS; the model's own generation_config may list others.
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        text: the answer, without the prompt, the EOS, and the newline that ends every turn.
        token_ids: the generated ids, up to and including the EOS when there is one.
        stopped_at_eos: False when generation hit `max_new_tokens` first (the answer is cut short).
    """

    text: str
    token_ids: list[int]
    stopped_at_eos: bool


def _answer(new_ids: Sequence[int], tokenizer: Any, prompt_format: PromptFormat) -> Generation:
    new_ids = list(new_ids)
    end_of_turn = prompt_format.end_of_turn_token_id
    stopped = end_of_turn in new_ids
    answer_ids = new_ids[: new_ids.index(end_of_turn)] if stopped else new_ids
    text = tokenizer.decode(answer_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if stopped:
        # What the format writes between the content and the end-of-turn token (MFTCoder's `\n`)
        # belongs to the format, not the content.
        text = prompt_format.answer_text(text)
    return Generation(text=text, token_ids=new_ids[: len(answer_ids) + stopped], stopped_at_eos=stopped)


def resolve_prompt_format(
    tokenizer: Any,
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
) -> PromptFormat:
    """`chat_template` itself when it is a `PromptFormat`, else the format it names."""
    if isinstance(chat_template, PromptFormat):
        return chat_template
    return get_prompt_format(tokenizer, chat_template, role_markers, eos_token)


@torch.no_grad()
def generate_from_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[InferencePrompt],
    options: GenerationOptions | None = None,
    prompt_format: PromptFormat | None = None,
) -> list[Generation]:
    """Generate one answer per prompt, all in one `generate` call (left-padded).

    Args:
        prompts: from `build_inference_prompt`; their `input_ids` go to the model unchanged.
        prompt_format: the format the prompts are in; its end-of-turn token ends an answer
            (default MFTCoder's format, which ends answers with the tokenizer's EOS).
    """
    if not prompts:
        return []
    options = options or GenerationOptions()
    prompt_format = prompt_format or get_prompt_format(tokenizer)
    eos_token_id = prompt_format.end_of_turn_token_id
    pad_token_id = padding_token_id(tokenizer, fallback=eos_token_id)
    width = max(len(p.input_ids) for p in prompts)
    # Left padding, so that every row's next token follows its prompt directly.
    input_ids = torch.tensor([[pad_token_id] * (width - len(p.input_ids)) + p.input_ids for p in prompts])  # [B, L]
    attention_mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    device = model.device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=options.generation_config(eos_token_id, pad_token_id),
    )  # [B, L + new]
    return [_answer(row[width:].tolist(), tokenizer, prompt_format) for row in output]


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]] | Mapping[str, Any]],
    options: GenerationOptions | None = None,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    batch_size: int = 8,
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> list[Generation]:
    """Answer the last user turn of each conversation.

    Args:
        conversations: lists of `{"role", "content"}` turns ending with a user turn (roles as in
            `chat_rounds`), or records with a `chat_rounds` key.
        options: decoding options (default greedy, 512 new tokens).
        role_markers, eos_token, chat_template: the prompt format, as in training (`DataConfig`); the
            defaults are MFTCoder's markers and the tokenizer's EOS. `chat_template` may also be a
            `PromptFormat`.
        batch_size: conversations per `generate` call.

    Raises:
        InvalidRecord: a conversation is not a valid prompt (the message says which rule it breaks).

    >>> generate_answers(model, tok, [[{"role": "user", "content": "hi"}]])[0].text   # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    prompts = [build_inference_prompt(c, tokenizer, chat_template=prompt_format) for c in conversations]
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        results += generate_from_prompts(model, tokenizer, prompts[start : start + batch_size], options, prompt_format)
    return results


class ChatSession:
    """A multi-round chat: each question is asked with the whole conversation so far as its prompt.

    >>> chat = ChatSession(model, tok, system="You are a careful programmer.")       # doctest: +SKIP
    >>> chat.ask("What does `git rebase` do?").text                                  # doctest: +SKIP
    >>> chat.reset()  # forget the rounds, keep the system prompt                    # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        options: GenerationOptions | None = None,
        system: str | None = None,
        role_markers: RoleMarkers | Mapping[str, str] | None = None,
        eos_token: str | None = None,
        chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or GenerationOptions()
        self.system = system
        self.prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
        self.history: list[dict[str, str]] = []

    def messages(self, question: str) -> list[dict[str, str]]:
        """The turns of the next prompt: system prompt, the rounds so far, then `question`."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": question}]

    def prompt(self, question: str) -> InferencePrompt:
        """The prompt that `ask(question)` would give the model."""
        return build_inference_prompt(self.messages(question), self.tokenizer, chat_template=self.prompt_format)

    def ask(self, question: str) -> Generation:
        """Answer `question` in the context of the conversation so far, and add the round to it.

        Raises:
            InvalidRecord: the question is empty.
        """
        generation = generate_from_prompts(
            self.model, self.tokenizer, [self.prompt(question)], self.options, self.prompt_format
        )[0]
        if generation.text.strip():
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": generation.text}]
        else:
            # An empty answer cannot be rendered (the format has no empty turns), so the round is not
            # kept; the conversation goes on from the previous round.
            logger.warning("the model gave an empty answer; this round is not kept in the history")
        return generation

    def reset(self) -> None:
        """Forget the rounds so far (the system prompt stays)."""
        self.history = []


# --------------------------------------------------------------------------------------------------
# Batch inference: jsonl -> jsonl


def record_messages(record: Any) -> list[dict[str, str]]:
    """The prompt turns of a batch-inference record, in any record format's prompt form
    (`mft_trainer.formats.prompt_messages`): a `chat_rounds`, `messages` or `conversations` list
    ending with a user turn, a `prompt` list of messages, or a single-turn prompt with one of the keys
    prompt, instruction, question, query or input (and an optional `system`); `instruction` +
    `input` are joined with a blank line as in training (Alpaca). Other keys (ids, reference
    answers) are ignored here and kept in the output.

    Raises:
        InvalidRecord: no prompt, several candidate prompts, or turns that are not a valid prompt.
    """
    return [{"role": m.role, "content": m.content} for m in prompt_messages(record)]


class BatchInputError(ValueError):
    """A batch-inference file has invalid records; the message lists each with its line."""


@dataclass(frozen=True)
class BatchRequest:
    """A batch-inference record with its prompt."""

    line: int
    record: dict[str, Any]
    prompt: InferencePrompt


def read_batch_requests(
    path: str | os.PathLike,
    tokenizer: Any,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    output_key: str = "generated",
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> list[BatchRequest]:
    """Read and check every record of a batch-inference jsonl file, before anything is generated.

    Raises:
        BatchInputError: some records are invalid (each listed with its line and what is wrong).
    """
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    requests, errors = [], []
    for line, raw, problem in iter_json_texts(path, SourceKind.JSONL):
        try:
            if problem is not None:
                raise InvalidRecord(Problem.MALFORMED_JSON, problem)
            decoded = decode_json(raw)
            prompt = build_inference_prompt(record_messages(decoded), tokenizer, chat_template=prompt_format)
            if output_key in decoded:
                raise InvalidRecord(
                    Problem.AMBIGUOUS_FORMAT,
                    f"record already has the output key {output_key!r}; choose another output key",
                )
            requests.append(BatchRequest(line, decoded, prompt))
        except InvalidRecord as e:
            errors.append(RecordError(str(path), line, e.problem, str(e)))
    if errors:
        listed = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise BatchInputError(f"{len(errors)} invalid record(s) in {path}; nothing was generated:\n{listed}{more}")
    return requests


def run_batch(
    model: Any,
    tokenizer: Any,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    role_markers: RoleMarkers | Mapping[str, str] | None = None,
    eos_token: str | None = None,
    output_key: str = "generated",
    chat_template: str | PromptFormat = ChatTemplateMode.MFTCODER.value,
) -> int:
    """Answer every record of a jsonl file; write each record plus `{output_key: answer}` as jsonl.

    Records are written in input order as each batch finishes. Returns the number of records.

    >>> options = GenerationOptions(max_new_tokens=256)                                    # doctest: +SKIP
    >>> run_batch(model, tok, "questions.jsonl", "answers.jsonl", options)                 # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_format = resolve_prompt_format(tokenizer, chat_template, role_markers, eos_token)
    requests = read_batch_requests(input_path, tokenizer, output_key=output_key, chat_template=prompt_format)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    cut_short = 0
    with open(output_path, "w", encoding="utf-8") as out:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            generations = generate_from_prompts(model, tokenizer, [r.prompt for r in batch], options, prompt_format)
            for request, generation in zip(batch, generations, strict=True):
                out.write(json.dumps({**request.record, output_key: generation.text}, ensure_ascii=False) + "\n")
                cut_short += not generation.stopped_at_eos
            out.flush()  # finished batches survive an interruption
            logger.info("answered %d/%d records", start + len(batch), len(requests))
    if cut_short:
        logger.warning("%d of %d answers hit max_new_tokens before EOS and are cut short", cut_short, len(requests))
    return len(requests)


# --------------------------------------------------------------------------------------------------
# Interactive chat

CHAT_COMMANDS = {
    "/reset": "forget the conversation (keeps the system prompt)",
    "/exit": "quit (also /quit, or end of input)",
    "/help": "show these commands",
}


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
        out: where answers go.
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
            out.write(f"{'model> ' if echo else ''}{generation.text}{cut}\n\n")
        out.write(prompt_prefix)
        out.flush()
