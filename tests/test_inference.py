"""Chat and batch inference: the model is prompted with the training tokens, stops at EOS, keeps history.

A tiny random Llama saved to disk stands in for a fine-tuned model. Random weights never choose EOS
on their own, so the EOS tests make the EOS a token the model is known to produce (`eos_token`, as
a run that sets DataConfig.eos_token would).
"""

import copy
import json
import runpy
import subprocess
import sys

import pytest
import torch

from mft_trainer import build_inference_prompt, render_conversation
from mft_trainer.chat_template import install_chat_template
from mft_trainer.batch_inference import BatchInputError, run_batch
from mft_trainer.generation import ChatSession, GenerationOptions, generate_answers
from mft_trainer.model_loading import load_model_and_tokenizer

from .conftest import REPO
from .helpers import tiny_llama, write_jsonl

EOS = 50256
SHORT = GenerationOptions(max_new_tokens=6)

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "human", "content": "Name a sorting algorithm."},
    {"role": "bot", "content": "Quicksort."},
    {"role": "human", "content": "Its average complexity?"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A full model directory as training saves it: weights, tokenizer with the chat template."""
    path = tmp_path_factory.mktemp("model")
    tok = copy.deepcopy(tokenizer)
    install_chat_template(tok)
    tiny_llama(len(tok), bos_token_id=EOS, eos_token_id=EOS).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")


def capture_generate(monkeypatch, model):
    """Record the keyword arguments of every `model.generate` call (the call still runs)."""
    calls = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def first_new_token_index(ids, start=2):
    """An index k >= start whose token does not occur before it (so it can serve as a stop token)."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


def test_loaded_model_directory(loaded):
    model, tokenizer = loaded
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is None  # the GPT-2 tokenizer has none: generation must cope


def test_generate_is_given_the_training_prompt_left_padded(loaded, monkeypatch):
    model, tokenizer = loaded
    calls = capture_generate(monkeypatch, model)
    conversations = [[{"role": "user", "content": "hi"}], HISTORY]
    generate_answers(model, tokenizer, conversations, SHORT, batch_size=2)

    (call,) = calls
    input_ids, mask = call["input_ids"], call["attention_mask"]  # [2, L]
    for row, conversation in enumerate(conversations):
        prompt = build_inference_prompt(conversation, tokenizer)
        n = len(prompt.input_ids)
        # The real tokens are the renderer's ids (= the training ids up to the answer), at the right end.
        assert input_ids[row, -n:].tolist() == prompt.input_ids
        assert mask[row].tolist() == [0] * (input_ids.shape[1] - n) + [1] * n
        # ... and the ids the saved chat template gives.
        templated = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert templated == prompt.input_ids
    # No pad token: padding uses EOS, and generation stops at EOS only.
    assert input_ids[0, 0].item() == EOS
    assert call["generation_config"].eos_token_id == EOS
    assert call["generation_config"].pad_token_id == EOS


def test_prompt_is_the_training_prefix(loaded):
    """What the model is asked is exactly what it was trained on before the answer."""
    _, tokenizer = loaded
    prompt = build_inference_prompt(HISTORY, tokenizer)
    trained = render_conversation({"chat_rounds": HISTORY + [{"role": "bot", "content": "O(n log n)."}]}, tokenizer)
    assert trained["input_ids"][: len(prompt.input_ids)] == prompt.input_ids
    assert trained["labels"][len(prompt.input_ids)] != -100


def test_greedy_is_deterministic_and_independent_of_batching(loaded):
    model, tokenizer = loaded
    conversations = [[{"role": "user", "content": "hi"}], HISTORY, [{"role": "user", "content": "Write a sort."}]]
    options = GenerationOptions(max_new_tokens=10)
    batched = generate_answers(model, tokenizer, conversations, options, batch_size=3)
    again = generate_answers(model, tokenizer, conversations, options, batch_size=3)
    one_by_one = generate_answers(model, tokenizer, conversations, options, batch_size=1)
    assert batched == again
    # Left padding is masked out: a batched answer is the answer alone.
    assert [g.token_ids for g in batched] == [g.token_ids for g in one_by_one]
    assert all(len(g.token_ids) == 10 and not g.stopped_at_eos for g in batched)


def test_decoding_stops_at_eos_and_the_answer_excludes_prompt_and_eos(loaded):
    model, tokenizer = loaded
    question = [{"role": "user", "content": "Write a sort."}]
    free = generate_answers(model, tokenizer, [question], GenerationOptions(max_new_tokens=12))[0]
    k = first_new_token_index(free.token_ids)
    stop = tokenizer.convert_ids_to_tokens(free.token_ids[k])

    stopped = generate_answers(model, tokenizer, [question], GenerationOptions(max_new_tokens=12), eos_token=stop)[0]
    assert stopped.stopped_at_eos
    assert stopped.token_ids == free.token_ids[: k + 1]  # generation ended at the EOS, which is kept in the ids
    expected = tokenizer.decode(free.token_ids[:k])
    assert stopped.text == (expected[:-1] if expected.endswith("\n") else expected)
    assert "<s>human" not in stopped.text and "Write a sort." not in stopped.text


def test_answer_text_drops_only_the_format_newline(loaded, monkeypatch):
    """`{answer}\\n` + EOS is how answers end in training; the content keeps its own newlines."""
    model, tokenizer = loaded
    answer_ids = tokenizer.encode("def f():\n    pass\n\n", add_special_tokens=False)
    generated = answer_ids + [EOS, EOS, EOS]  # EOS, then padding (pad = EOS)
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: torch.cat(
        [input_ids, torch.tensor([generated] * input_ids.shape[0])], dim=1))
    (generation,) = generate_answers(model, tokenizer, [[{"role": "user", "content": "q"}]], SHORT)
    assert generation.text == "def f():\n    pass\n"
    assert generation.token_ids == answer_ids + [EOS]
    assert generation.stopped_at_eos


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(max_new_tokens=5, num_beams=3),
        GenerationOptions(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9),
        GenerationOptions(max_new_tokens=5, do_sample=True, top_k=20, num_beams=2),
    ],
    ids=["beams", "top_p", "beam_sample"],
)
def test_decoding_options_reach_generate(loaded, monkeypatch, options):
    model, tokenizer = loaded
    calls = capture_generate(monkeypatch, model)
    torch.manual_seed(0)
    first = generate_answers(model, tokenizer, [HISTORY], options)
    torch.manual_seed(0)
    assert generate_answers(model, tokenizer, [HISTORY], options) == first  # reproducible with a seed
    config = calls[0]["generation_config"]
    assert (config.num_beams, config.do_sample, config.max_new_tokens) == (
        options.num_beams, options.do_sample, options.max_new_tokens)
    if options.do_sample:
        assert (config.temperature, config.top_p, config.top_k) == (options.temperature, options.top_p, options.top_k)
    assert len(first[0].token_ids) == 5


def test_sampling_options_without_sampling_are_an_error():
    with pytest.raises(ValueError, match="temperature set but sampling is off"):
        GenerationOptions(temperature=0.2)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationOptions(do_sample=True, top_p=0)


def test_chat_session_carries_history_and_resets(loaded):
    model, tokenizer = loaded
    chat = ChatSession(model, tokenizer, SHORT, system="You are terse.")
    first = chat.ask("Name a sorting algorithm.")
    second_prompt = chat.prompt("Its complexity?")
    assert second_prompt.text == (
        "<s>system\nYou are terse.\n<s>human\nName a sorting algorithm.\n<s>bot\n"
        f"{first.text}\n<|endoftext|>\n<s>human\nIts complexity?\n<s>bot\n"
    )
    expected = build_inference_prompt(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a sorting algorithm."},
         {"role": "assistant", "content": first.text}, {"role": "user", "content": "Its complexity?"}], tokenizer)
    assert second_prompt == expected
    chat.ask("Its complexity?")
    assert len(chat.history) == 4
    chat.reset()
    assert chat.prompt("q").text == "<s>system\nYou are terse.\n<s>human\nq\n<s>bot\n"


def test_chat_session_drops_a_round_with_an_empty_answer(loaded):
    model, tokenizer = loaded
    first_token = generate_answers(model, tokenizer, [[{"role": "user", "content": "q"}]], SHORT)[0].token_ids[0]
    chat = ChatSession(model, tokenizer, SHORT, eos_token=tokenizer.convert_ids_to_tokens(first_token))
    generation = chat.ask("q")  # the model's first token is now EOS: an empty answer
    assert generation.text == "" and generation.stopped_at_eos
    assert chat.history == []  # an empty turn cannot be rendered, so the round is not kept
    chat.prompt("next")  # and the conversation can go on


def test_prompt_records_match_training_prompts(tokenizer):
    for record, answer_key in [
        ({"instruction": "Sum.", "input": "[1, 2]"}, "output"),
        ({"system": "Be brief.", "prompt": "Q"}, "answer"),
        ({"question": "Q", "system": ""}, "answer"),
        ({"input": "x"}, "output"),
    ]:
        prompt = build_inference_prompt(record, tokenizer)
        trained = render_conversation({**record, answer_key: "A"}, tokenizer)
        assert trained["input_ids"][: len(prompt.input_ids)] == prompt.input_ids, record
        assert trained["input_ids"][len(prompt.input_ids):] == tokenizer.encode("A\n") + [EOS], record


def test_batch_inference_writes_one_answer_per_record_in_order(loaded, tmp_path):
    model, tokenizer = loaded
    records = [
        {"id": 1, "chat_rounds": HISTORY},
        {"id": 2, "prompt": "Write a sort.", "reference": "sorted(x)"},
        {"id": 3, "instruction": "Sum.", "input": "[1, 2]"},
        {"id": 4, "chat_rounds": [{"role": "user", "content": "hi"}]},
        {"id": 5, "system": "S", "question": "Why?"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    count = run_batch(model, tokenizer, source, tmp_path / "out" / "answers.jsonl", SHORT, batch_size=2)
    assert count == 5
    written = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    expected = generate_answers(model, tokenizer, records, SHORT)
    assert [{k: v for k, v in w.items() if k != "generated"} for w in written] == records
    assert [w["generated"] for w in written] == [g.text for g in expected]


def test_batch_inference_checks_every_record_first(loaded, tmp_path):
    model, tokenizer = loaded
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "fine"},
        {"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]},
        "{not json",
        {"id": 4},
        {"prompt": "q", "query": "q"},
        {"id": 6, "question": "  "},
    ])
    with pytest.raises(BatchInputError) as error:
        run_batch(model, tokenizer, source, tmp_path / "out.jsonl", SHORT)
    message = str(error.value)
    assert "5 invalid record(s)" in message and "nothing was generated" in message
    for line, reason in [(2, "the last turn must be the user's question"), (3, "malformed JSON"),
                         (4, "no prompt"), (5, "several prompt keys"), (6, "'question' is empty")]:
        assert any(f"in.jsonl:{line}:" in row and reason in row for row in message.splitlines()), (line, message)
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# scripts/chat.py


def run_chat_in_process(monkeypatch, args):
    """Run the script's main() here (a subprocess would spend ~10 s importing torch and peft again)."""
    monkeypatch.setattr(sys, "argv", ["scripts/chat.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "chat.py"), run_name="__main__")
    return exit_.value.code


def test_chat_script_batch_mode_with_a_lora_adapter(loaded, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = loaded
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(tmp_path / "adapter")  # no tokenizer here: the base model's is used
    records = [{"chat_rounds": HISTORY}, {"prompt": "Write a sort."}, {"question": "hi"}]
    source = write_jsonl(tmp_path / "in.jsonl", records)

    code = run_chat_in_process(monkeypatch, [
        "--model", tmp_path / "adapter", "--input", source, "--output", tmp_path / "out.jsonl",
        "--max_new_tokens", 6, "--batch_size", 2, "--dtype", "float32", "--device", "cpu",
    ])
    assert code == 0
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = generate_answers(peft_model.eval(), tokenizer, records, SHORT)
    assert [w["generated"] for w in written] == [g.text for g in expected]
    # The adapter changes the answers: the script really loaded it on top of the base.
    assert expected != generate_answers(model, tokenizer, records, SHORT)


def test_chat_script_interactive_mode_keeps_history_until_reset_and_exits(loaded, model_dir):
    model, tokenizer = loaded
    stdin = "Name a sorting algorithm.\nIts complexity?\n/reset\nhi\n/exit\nnever asked\n"
    # As a user runs it: a subprocess fed through stdin.
    result = subprocess.run(
        [sys.executable, "scripts/chat.py", "--model", str(model_dir), "--max_new_tokens", "6", "--show_prompt",
         "--system", "Be terse."],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    shown = [json.loads(line[len("prompt: "):]) for line in result.stderr.splitlines() if line.startswith("prompt: ")]

    # The same conversation in-process: the script must have prompted exactly like this.
    chat = ChatSession(model, tokenizer, SHORT, system="Be terse.")
    expected_prompts, answers = [], []
    for question in ("Name a sorting algorithm.", "Its complexity?", None, "hi"):
        if question is None:
            chat.reset()
            continue
        expected_prompts.append(chat.prompt(question).text)
        answers.append(chat.ask(question))
    assert shown == expected_prompts  # three questions; nothing after /exit
    assert "Name a sorting algorithm." in shown[1] and answers[0].text in shown[1]  # history carried
    assert "Name a sorting algorithm." not in shown[2]  # /reset forgot it
    cut = " [cut short: max_new_tokens reached]"
    assert result.stdout == (
        f"{answers[0].text}{cut}\n\n{answers[1].text}{cut}\n\n(conversation reset)\n{answers[2].text}{cut}\n\n"
    )


@pytest.mark.parametrize("generated_text,stops,shown", [
    ("", True, "(empty answer: the model ended its turn at once)"),
    ("\n\n\n", False, "(empty answer: 3 whitespace character(s)) [cut short: max_new_tokens reached]"),
], ids=["eos_at_once", "whitespace"])
def test_an_empty_answer_is_one_line_on_the_terminal_and_empty_in_batch_output(
    loaded, monkeypatch, tmp_path, generated_text, stops, shown
):
    import io

    from mft_trainer.terminal_chat import run_interactive

    model, tokenizer = loaded
    generated = tokenizer.encode(generated_text, add_special_tokens=False) + ([EOS] if stops else [])
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: torch.cat(
        [input_ids, torch.tensor([generated] * input_ids.shape[0])], dim=1))
    for echo, expected in ((False, f"{shown}\n\n"), (True, f"user> q\nmodel> {shown}\n\n")):
        out = io.StringIO()
        run_interactive(ChatSession(model, tokenizer, SHORT), ["q\n"], out, echo=echo)
        assert out.getvalue() == expected
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q"}])
    run_batch(model, tokenizer, source, tmp_path / "out.jsonl", SHORT)
    assert json.loads((tmp_path / "out.jsonl").read_text())["generated"] == generated_text  # the real text


def test_chat_script_says_when_an_answer_is_empty(loaded, model_dir, monkeypatch, capsys):
    import io

    model, tokenizer = loaded
    first_token = generate_answers(model, tokenizer, [[{"role": "user", "content": "q"}]], SHORT)[0].token_ids[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("q\n"))
    code = run_chat_in_process(monkeypatch, [  # the model's first token is now its end of turn
        "--model", model_dir, "--max_new_tokens", 6, "--dtype", "float32", "--device", "cpu", "--echo",
        "--eos_token", tokenizer.convert_ids_to_tokens(first_token),
    ])
    assert code == 0
    assert capsys.readouterr().out == "user> q\nmodel> (empty answer: the model ended its turn at once)\n\n"


def test_single_turn_prompts_are_the_training_prompts(tokenizer):
    """Batch-inference prompts of single-turn records equal the untrained part of the training sample."""
    from mft_trainer import build_inference_prompt, render_conversation

    for record in ({"instruction": "Sum.", "input": "[1, 2]", "response": "3", "system": "Be brief."},
                   {"instruction": "Sum.", "input": "[1, 2]", "output": "3"},
                   {"question": "Why?", "answer": "Because.", "system": ""}):
        trained = render_conversation(record, tokenizer)
        prompt = build_inference_prompt(record, tokenizer)
        first_trained = next(i for i, label in enumerate(trained["labels"]) if label != -100)
        assert trained["input_ids"][:first_trained] == prompt.input_ids, record


@pytest.fixture(scope="module")
def chatml_model():
    """A tiny random Llama with the SmolLM2 tokenizer, prompted in that tokenizer's own template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "examples" / "tokenizers" / "smollm2-135m-instruct")
    return tiny_llama(len(tok)).eval(), tok


def test_template_mode_prompts_in_the_template_and_stops_at_its_end_of_turn(chatml_model, monkeypatch, tmp_path):
    """In `model` mode the prompt is apply_chat_template's, and an answer ends at <|im_end|> (id 2)."""
    model, tok = chatml_model
    answer_ids = tok.encode("def f():\n    pass", add_special_tokens=False)
    calls = []

    def generate(input_ids, generation_config, **kwargs):
        calls.append((input_ids, generation_config))
        tail = torch.tensor([answer_ids + [2, 5, 6]] * input_ids.shape[0])  # the end of turn, then anything
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    question = [{"role": "user", "content": "Write f."}]
    (generation,) = generate_answers(model, tok, [question], SHORT, chat_template="model")
    assert generation.text == "def f():\n    pass" and generation.stopped_at_eos
    assert generation.token_ids == answer_ids + [2]
    input_ids, config = calls[0]
    assert input_ids[0].tolist() == tok.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    assert config.eos_token_id == 2

    # Batch inference and a multi-round chat are prompted the same way.
    source = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Write f."}])
    run_batch(model, tok, source, tmp_path / "a.jsonl", SHORT, chat_template="model")
    assert json.loads((tmp_path / "a.jsonl").read_text())["generated"] == "def f():\n    pass"
    session = ChatSession(model, tok, SHORT, chat_template="model")
    session.ask("Write f.")
    second = session.prompt("Again.")
    conversation = [*question, {"role": "assistant", "content": "def f():\n    pass"}, {"role": "user", "content": "Again."}]
    assert second.text == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_echo_writes_a_transcript(loaded):
    import io

    from mft_trainer.terminal_chat import run_interactive

    model, tokenizer = loaded
    out = io.StringIO()
    run_interactive(ChatSession(model, tokenizer, SHORT), ["first?\n", "second?\n"], out, echo=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "user> first?" and lines[1].startswith("model> ")
    assert "user> second?" in lines
