"""`instructkit chat MODEL`: an interactive session with a model.

Each line read is a user turn; the whole conversation so far goes through the model's chat
template (the same rendering as in training; Alpaca for a tokenizer without one) and the
answer is streamed token by token. ``/reset`` clears the history, ``/exit`` (or end of input)
quits. The oldest turns are dropped when the conversation outgrows the model's context.

Run it as ``instructkit chat MODEL`` (it reads stdin, so it can be piped).
"""

from __future__ import annotations

import sys
from typing import TextIO

from instructkit.errors import UserError

COMMANDS = "/reset clears the history, /exit quits"


def _streamer(tokenizer, out: TextIO):
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        """Writes finished pieces of text to ``out`` as they are decoded."""

        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:  # the answer as stored: no leading whitespace
                text = text.lstrip()
                self.started = bool(text)
            out.write(text)
            if stream_end:
                out.write("\n")
            out.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive and stdin is sys.stdin:
        try:
            return input("you> ")
        except EOFError:
            return None
    if interactive:
        stdout.write("you> ")
        stdout.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def _fit(history: list[dict], ids_of, limit: int | None) -> list[int]:
    """Prompt ids of ``history``, dropping the oldest exchanges (a system message stays) until
    the prompt fits ``limit`` tokens; an over-long single turn keeps its end."""
    ids = ids_of(history)
    while limit is not None and len(ids) > limit:
        first = 1 if history and history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            return ids[-limit:]
        del history[first : first + 2]  # the oldest user turn and its answer
        ids = ids_of(history)
    return ids


def chat(
    model_path: str | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    device: str = "auto",
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    template: str = "auto",
    model=None,
    tokenizer=None,
    seed: int | None = None,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
) -> list[dict]:
    """Run a chat session reading user lines from ``stdin`` and streaming answers to
    ``stdout`` (default: the process's). Give ``model_path`` (any path ``generate`` takes) or
    a loaded ``model`` and ``tokenizer``. Returns the conversation at the end (after the last
    ``/reset``): ``[{"role", "content"}]``."""
    import torch

    from instructkit.data import build_prompt_ids
    from instructkit.data.templates import resolve_template
    from instructkit.generate import check_sampling, generation_kwargs, stop_token_ids

    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    check_sampling(max_new_tokens, temperature, top_p, top_k=top_k, repetition_penalty=repetition_penalty)
    if model is None:
        if not model_path:
            raise UserError("chat: give a model (a final/ folder, HF folder, hub id, .gguf or tiny preset)")
        from instructkit.models import load_for_inference

        model, tokenizer = load_for_inference(model_path, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    template = resolve_template(template, tokenizer)
    interactive = bool(getattr(stdin, "isatty", lambda: False)())
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = max(ctx - max_new_tokens, 1) if ctx else None
    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict] = list(base)
    if interactive:
        _say(stdout, f"chat with {model_path or type(model).__name__} ({COMMANDS})\n")

    def ids_of(conv):
        return build_prompt_ids(conv, tokenizer, template)

    sampling = generation_kwargs(model, tokenizer, stop_token_ids(tokenizer, model, template),
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, repetition_penalty=repetition_penalty)
    while True:
        line = _read_line(stdin, stdout, interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            _say(stdout, "(history cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            _say(stdout, f"(unknown command {text}; {COMMANDS})\n")
            continue
        history.append({"role": "user", "content": text})
        answer = _reply(model, tokenizer, _fit(history, ids_of, limit), sampling, stdout, interactive)
        if answer is None:  # interrupted: the question is dropped with it
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
    return history


def _say(stdout: TextIO, text: str) -> None:
    stdout.write(text)
    stdout.flush()


def _reply(model, tokenizer, ids: list[int], sampling: dict, stdout: TextIO, interactive: bool) -> str | None:
    """The answer to the prompt ``ids``, streamed to ``stdout`` as it is generated; None when
    Ctrl-C interrupted it."""
    import torch

    from instructkit.generate import generate_tokens

    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    if interactive:
        _say(stdout, "assistant> ")
    try:
        new = generate_tokens(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
                              dict(sampling, streamer=_streamer(tokenizer, stdout)))
    except KeyboardInterrupt:
        _say(stdout, "\n(interrupted)\n")
        return None
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()
