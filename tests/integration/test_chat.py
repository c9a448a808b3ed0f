"""`python -m llm_stages chat`: the loop's commands on a StringIO, the model's streamed reply, and the
command itself in a pseudo-terminal replying what model.generate replies to the same rendered prompt."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_stages.chat import chat_loop, model_reply, prompt_text

from ..conftest import REPO, TEST_MODEL

MAX_NEW_TOKENS = 16


SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = {"role": "user", "content": "hello"}
# What the exported model has memorised: a reply to "hello" without a system message, and another with one.
REPLIES = {"": "Hello there, how are you today?", "Be brief.": "Hi."}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model (seeded) that has memorised REPLIES, saved as an export: (directory, model, tokenizer)."""
    from llm_stages.config import compose
    from llm_stages.data.render import render_conversation
    from llm_stages.models import load_model, load_tokenizer

    cfg = compose(["model=tiny", *TEST_MODEL], config_name="chat")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    examples = [render_conversation(tokenizer, ([SYSTEM, HELLO] if system else [HELLO])
                                    + [{"role": "assistant", "content": reply}]) for system, reply in REPLIES.items()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        loss = sum(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    model.eval()
    out = tmp_path_factory.mktemp("chat") / "export"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


def greedy_reply(model, tokenizer, messages: list[dict]) -> str:
    """The reference: model.generate on the rendered prompt, greedy."""
    ids = torch.tensor([tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_commands_change_the_conversation_the_template_renders(tokenizer):
    seen = []

    def fake_reply(messages, out):
        seen.append(messages)
        out.write(f"r{len(seen)}")
        return f"r{len(seen)}"

    script = "hello\n/system Be brief.\nhi\n\nthere\n/reset\nagain\n/system\nbye\n/quit\nnever read\n"
    out = io.StringIO()
    chat_loop(fake_reply, io.StringIO(script), out)
    system = {"role": "system", "content": "Be brief."}
    assert seen == [
        [{"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "hi"}],  # /system clears the conversation
        [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "r2"},
         {"role": "user", "content": "there"}],
        [system, {"role": "user", "content": "again"}],  # /reset keeps the system message
        [{"role": "user", "content": "bye"}],  # /system alone removes it
    ]
    assert prompt_text(tokenizer, seen[2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nr2<|im_end|>\n<|im_start|>user\nthere<|im_end|>\n<|im_start|>assistant\n")
    assert "r3\n>>> " in out.getvalue() and "never read" not in out.getvalue()

    seen.clear()
    chat_loop(fake_reply, io.StringIO("/system S\nlast"), io.StringIO(), system="ignored")  # ends at EOF
    assert seen == [[{"role": "system", "content": "S"}, {"role": "user", "content": "last"}]]


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)
        return super().write(text)


def test_model_reply_streams_what_generate_returns(export):
    _, model, tokenizer = export
    reply = model_reply(model, tokenizer, {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False})
    for messages, expected in (([HELLO], REPLIES[""]), ([SYSTEM, HELLO], REPLIES["Be brief."])):
        out = Writes()
        assert reply(messages, out) == greedy_reply(model, tokenizer, messages) == expected
        assert "".join(out.chunks) == expected
    out = Writes()
    reply([HELLO], out)
    assert [c for c in out.chunks if c] == ["Hello ", "there, ", "how ", "are ", "you ", "today?"]  # word by word


def _read_until(fd: int, marker: str, seen: str, timeout: float = 600.0) -> str:
    """Everything the terminal shows up to `marker` (after what was `seen`), escape codes removed. The
    timeout only catches a hung command: on a loaded machine its start alone (torch, the model) took
    over 60 s."""
    deadline = time.monotonic() + timeout
    text = seen
    while marker not in text[len(seen):]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {marker!r} within {timeout}s; the terminal shows:\n{text}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        assert chunk, f"the terminal closed before {marker!r}:\n{text}"
        text += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", chunk.decode(errors="replace")).replace("\r\n", "\n")
    return text


@pytest.mark.slow  # a second interpreter importing torch and loading the model: over 5 s
def test_chat_in_a_pseudo_terminal(export):
    """Scripted typing into the real command: each reply is the one greedy generation gives for the
    conversation so far (the memorised one), /system changes it, /quit exits 0."""
    directory, model, tokenizer = export
    main, child = os.openpty()
    env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_stages", "chat", f"model.path={directory}", "generation.do_sample=false",
         f"generation.max_new_tokens={MAX_NEW_TOKENS}"], stdin=child, stdout=child, stderr=child, cwd=REPO, env=env)
    os.close(child)
    try:
        shown = _read_until(main, ">>> ", "")

        def say(line: str) -> str:
            nonlocal shown
            before = len(shown)
            os.write(main, line.encode() + b"\n")
            shown = _read_until(main, ">>> ", shown)
            return shown[before:].split(line + "\n", 1)[1].removesuffix(">>> ")

        assert say("hello") == REPLIES[""] + "\n"
        assert say("/system Be brief.") == "(system message set; conversation cleared)\n"
        assert say("hello") == greedy_reply(model, tokenizer, [SYSTEM, HELLO]) + "\n" == REPLIES["Be brief."] + "\n"
        os.write(main, b"/quit\n")
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)


@pytest.mark.parametrize("override, message", [
    ("generation.temperature=0", "error: generation.temperature=0: expected a number > 0"),
    ("+generation.repetition_penalty=1.2", "error: generation.repetition_penalty: sampling takes only max_new_tokens"),
    ("model.path=/nonexistent/export", "error: model.path=/nonexistent/export: no such directory"),
    ("generation.nope=1", "error: generation.nope=1: no such key in the config"),
])
def test_a_bad_setting_is_one_line_before_loading(override, message, monkeypatch, capsys):
    from llm_stages.__main__ import cli

    monkeypatch.setattr(sys, "argv", ["llm_stages", "chat", override])
    with pytest.raises(SystemExit) as exit_:
        cli()
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith(message) and error.count("\n") == 1
