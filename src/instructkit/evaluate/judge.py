"""LLM-as-judge: score responses 1-5 against a rubric, and pairwise win rates.

Backends:

- ``openai``: any OpenAI-compatible chat-completions endpoint (Ollama, vLLM, llama.cpp's
  server, OpenAI). ``POST {base_url}/chat/completions`` with ``{"model", "messages",
  "temperature": 0, "max_tokens"}`` over ``urllib`` (no extra dependency); the API key, when
  ``judge.api_key_env`` names an environment variable, goes in an ``Authorization: Bearer``
  header and nowhere else; ``user:password@`` in ``judge.base_url`` is sent as basic auth. Both
  are masked in every message, including server replies that echo them. Connection errors,
  timeouts, 429 and 5xx are retried with exponential backoff; requests run
  ``judge.concurrency`` at a time.
- ``hf``: a local Hugging Face model, greedy, through :func:`instructkit.generate.generate_responses`.

The prompts come from Markdown files users can replace (``judge.rubric_path``,
``judge.pairwise_path``); ``<!-- ... -->`` comments in them are not sent. The rubric asks for
a final line ``Score: N`` (a JSON ``{"score": N}`` is read too); the pairwise prompt for
``Winner: 1``, ``Winner: 2`` or ``Winner: tie``. A reply without a readable verdict is kept
as *unparseable*: counted, excluded from the mean, not sent again.

Every judgement is appended to a JSONL log as soon as it arrives, keyed by a hash of the
judge, the prompt file and the texts judged; a second run sends only what the log lacks.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

from instructkit.errors import ConfigError, UserError, snippet
from instructkit.redact import mask_text

log = logging.getLogger("instructkit.evaluate")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RUBRIC_FILE = ASSETS / "judge_rubric.md"
PAIRWISE_FILE = ASSETS / "judge_pairwise.md"

_COMMENT = re.compile(r"<!--.*?-->\n?", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{(prompt|response|response_1|response_2)\}")


# --------------------------------------------------------------------------- prompt files


def load_prompt_template(path: str | Path | None, kind: str = "rubric") -> str:
    """The judge prompt of ``path`` (default: the shipped file of ``kind``, ``rubric`` or
    ``pairwise``), comments removed; checks that it holds the placeholders it needs."""
    default = RUBRIC_FILE if kind == "rubric" else PAIRWISE_FILE
    key = "judge.rubric_path" if kind == "rubric" else "judge.pairwise_path"
    p = Path(path) if path is not None else default
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{key}={p}: cannot read the judge prompt ({e.strerror or e})") from None
    text = _COMMENT.sub("", text).strip()
    need = ("{prompt}", "{response}") if kind == "rubric" else ("{prompt}", "{response_1}", "{response_2}")
    missing = [n for n in need if n not in text]
    if missing:
        raise ConfigError(
            f"{key}={p}: the judge prompt lacks the placeholder(s) {', '.join(missing)}; "
            f"write them where the texts go (placeholders: {', '.join(need)})"
        )
    return text


def render_prompt(template: str, **values: str) -> str:
    """Fill ``{prompt}``, ``{response}``, ``{response_1}``, ``{response_2}`` in one pass (braces
    elsewhere, e.g. a JSON example, and braces inside the texts are left alone)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# --------------------------------------------------------------------------- parsing replies

_SCORE_LINE = re.compile(
    r"score\s*(?:\(1\s*-\s*5\))?\s*[:=]\s*[*_`\"']*\s*(\d+(?:\.\d+)?)\s*(?:/\s*5|out of 5)?",
    re.IGNORECASE,
)
_JSON_SCORE = re.compile(r"\{[^{}]*\"score\"\s*:\s*\"?(\d+(?:\.\d+)?)\"?[^{}]*\}", re.IGNORECASE)
_WINNER_LINE = re.compile(
    r"winner\s*[:=]\s*[*_`\"']*\s*(?:answer|response|assistant)?\s*(1|2|tie|a|b|none|neither|both)\b",
    re.IGNORECASE,
)
_JSON_WINNER = re.compile(r"\{[^{}]*\"winner\"\s*:\s*\"?(1|2|tie|a|b)\"?[^{}]*\}", re.IGNORECASE)


def _valid_score(raw: str) -> int | None:
    try:
        v = float(raw)
    except ValueError:
        return None
    if v.is_integer() and 1 <= v <= 5:
        return int(v)
    return None


def parse_score(reply: str | None) -> int | None:
    """A 1-5 integer score from a judge reply, or None when there is none: the last
    ``Score: N`` (also ``Score: N/5``, ``**Score:** N``), else a JSON ``{"score": N}``, else a
    reply that is only a digit 1-5. Other numbers (0, 7, 3.5) are not scores."""
    if not reply:
        return None
    lines = _SCORE_LINE.findall(reply)
    if lines:
        return _valid_score(lines[-1])
    js = _JSON_SCORE.findall(reply)
    if js:
        return _valid_score(js[-1])
    bare = reply.strip().strip("*.` ")
    return _valid_score(bare) if re.fullmatch(r"[1-5]", bare) else None


def parse_winner(reply: str | None) -> str | None:
    """``"1"``, ``"2"`` or ``"tie"`` from a pairwise judge reply (the last ``Winner: ...``
    line, else a JSON ``{"winner": ...}``, else a reply that is only 1, 2 or tie); None when
    there is no verdict."""
    if not reply:
        return None
    found = _WINNER_LINE.findall(reply) or _JSON_WINNER.findall(reply)
    if not found:
        bare = reply.strip().strip("*.` ").lower()
        found = [bare] if bare in ("1", "2", "tie") else []
    if not found:
        return None
    v = found[-1].lower()
    return {"1": "1", "a": "1", "2": "2", "b": "2"}.get(v, "tie")


def item_key(*parts: str) -> str:
    """Resume key of a judgement: a hash of the judge, the prompt file and the texts judged."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- backends


class JudgeBackend:
    """Turns judge prompts (user messages) into replies."""

    name: str = "judge"

    def run(self, prompts: Sequence[str], on_reply: Callable[[int, str], None]) -> None:
        """Call ``on_reply(i, reply)`` (in the calling thread) for every prompt, as replies arrive."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class OpenAIJudge(JudgeBackend):
    """A judge behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 concurrency: int = 4, max_tokens: int = 256):
        base, credentials = _split_credentials(base_url.rstrip("/"))  # credentials: "" if none
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}@{base}"
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self._api_key = None
        # user:password@ in judge.base_url is HTTP basic auth (urllib would take it for the
        # host name); the URL kept and shown is without it
        self._basic = base64.b64encode(credentials.encode()).decode() if credentials else None
        self._secrets = [x for x in (credentials, credentials.partition(":")[2], self._basic) if x]
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(
                    f"judge.api_key_env={api_key_env}, but the environment variable {api_key_env} "
                    f"is not set; export {api_key_env}=<your key>, or remove judge.api_key_env "
                    "for a server without keys (Ollama, vLLM, llama.cpp)"
                )
            self._api_key = key
            self._secrets.append(key)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    # one request --------------------------------------------------------------
    def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()
            except Exception:  # noqa: BLE001 - the status is what matters
                detail = b""
            return e.code, detail

    def complete(self, prompt: str) -> str:
        """The judge's reply to one user message; UserError when the endpoint is down, refuses,
        or does not speak the chat-completions protocol (after the retries)."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, raw = self._post(body)
            except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
                    last = f"no answer within judge.timeout_s={self.timeout_s:g}s"
                else:
                    last = f"not reachable ({mask_text(str(reason), self._secrets)})"
                continue
            text = mask_text(raw.decode("utf-8", errors="replace"), self._secrets)  # a server may echo the key
            if status == 429 or status >= 500:
                last = f"answered HTTP {status}: {snippet(text)}"
                continue
            if status >= 400:
                hint = {401: "check the API key (judge.api_key_env)",
                        403: "check the API key (judge.api_key_env)",
                        404: "check judge.base_url (usually ends in /v1) and judge.model"}.get(
                            status, "check judge.model and judge.base_url")
                raise UserError(
                    f"judge endpoint {self.url} answered HTTP {status}: {snippet(text)}; {hint}"
                )
            reply = _chat_content(text)
            if reply is None:
                last = ("answered with something that is not a chat-completions response: "
                        f"{snippet(text)}")
                continue
            return reply
        if last.startswith("not reachable"):
            raise UserError(
                f"judge endpoint {self.url} is {last} after {attempts} attempt(s); start the "
                "judge server (e.g. `ollama serve`, `vllm serve MODEL`, `llama-server -m "
                "MODEL.gguf`) or fix judge.base_url"
            )
        raise UserError(
            f"judge endpoint {self.url} {last} after {attempts} attempt(s); check that "
            "judge.base_url points to an OpenAI-compatible server (usually ending in /v1), or "
            "raise judge.timeout_s / judge.retries"
        )

    def run(self, prompts: Sequence[str], on_reply: Callable[[int, str], None]) -> None:
        if not prompts:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)),
                                  thread_name_prefix="judge")
        failure: BaseException | None = None
        try:
            futures = {pool.submit(self.complete, p): i for i, p in enumerate(prompts)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.cancelled():
                        continue
                    exc = f.exception()
                    if exc is not None:
                        if failure is None:  # stop sending; what is in flight still gets logged
                            failure = exc
                            for other in pending:
                                other.cancel()
                        continue
                    on_reply(futures[f], f.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise failure


def _chat_content(text: str) -> str | None:
    try:
        data = json.loads(text)
        msg = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(msg, dict):
        return None
    content = msg.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _split_credentials(url: str) -> tuple[str, str]:
    """``http://user:pass@host/v1`` -> (``http://host/v1``, ``"user:pass"``)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, ""
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(userinfo)


class HFJudge(JudgeBackend):
    """A local Hugging Face model as the judge (greedy decoding, batched)."""

    def __init__(self, model_path: str, device: str = "auto", batch_size: int = 4,
                 max_new_tokens: int = 256):
        from instructkit.models import load_for_inference

        self.model, self.tokenizer = load_for_inference(model_path, device=device)
        self.name = f"hf:{model_path}"
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def run(self, prompts: Sequence[str], on_reply: Callable[[int, str], None]) -> None:
        from instructkit.generate import generate_responses

        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            replies = generate_responses(self.model, self.tokenizer, chunk,
                                         max_new_tokens=self.max_new_tokens, temperature=0.0,
                                         batch_size=self.batch_size)
            for k, reply in enumerate(replies):
                on_reply(start + k, reply)

    def close(self) -> None:
        self.model = None


def make_judge(cfg) -> JudgeBackend:
    """The backend of a :class:`~instructkit.evaluate.config.JudgeSection`."""
    if cfg.backend == "hf":
        return HFJudge(cfg.hf_model, cfg.device, cfg.batch_size, cfg.max_new_tokens)
    return OpenAIJudge(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout_s, cfg.retries,
                       cfg.backoff_s, cfg.concurrency, cfg.max_new_tokens)


# --------------------------------------------------------------------------- the resumable log


class JudgementLog:
    """An append-only JSONL of judgements keyed by ``key``. A line cut off by a crash is
    dropped (and the file rewritten without it) when the log is opened again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            good: list[str] = []
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec
                    good.append(line)
            if len(good) != len(text.splitlines()) or (text and not text.endswith("\n")):
                log.warning("%s: dropped %d unreadable line(s) (a run stopped mid-write)",
                            self.path, len(text.splitlines()) - len(good))
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(l + "\n" for l in good), encoding="utf-8")
                tmp.replace(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[record["key"]] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- tasks


def judge_prompt_text(row: dict) -> str:
    """The prompt as the judge sees it: the instruction, or for a multi-turn prompt the
    conversation as a transcript."""
    messages = row.get("messages")
    if not messages or len(messages) <= 1:
        return str(row["prompt"])
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def _progress(total: int, done: int, enabled: bool, description: str):
    from instructkit.engine.logging import ProgressBar

    return ProgressBar(total=total, initial=done, enabled=enabled and total > done,
                       description=description)


def _collect(backend: JudgeBackend, todo: list[tuple[str, str, dict]], jlog: JudgementLog,
             parse: Callable[[str], object], field: str, total: int, progress: bool,
             description: str) -> None:
    """Send the ``(key, prompt, record)`` items of ``todo`` and log each verdict on arrival."""
    bar = _progress(total, total - len(todo), progress, description)
    done = [total - len(todo)]

    def on_reply(i: int, reply: str) -> None:
        key, _, record = todo[i]
        verdict = parse(reply)
        jlog.append({"key": key, **record, field: verdict, "judgement": reply})
        done[0] += 1
        bar.update(done[0])

    try:
        backend.run([p for _, p, _ in todo], on_reply)
    finally:
        bar.close()


def judge_responses(backend: JudgeBackend, rows: Sequence[dict], log_path: str | Path,
                    rubric: str, progress: bool = True) -> dict:
    """Score each ``{"prompt", "response"}`` row 1-5 with the rubric. Judgements are appended
    to ``log_path`` as they arrive; rows already there (same judge, rubric and texts) are not
    sent again. Returns the summary (mean over parseable judgements)."""
    items = []
    for row in rows:
        text = judge_prompt_text(row)
        key = item_key("score", backend.name, rubric, text, str(row["response"]))
        items.append((key, text, row))
    with JudgementLog(log_path) as jlog:
        seen, todo = set(), []
        for key, text, row in items:
            if key in jlog or key in seen:
                continue
            seen.add(key)
            prompt = render_prompt(rubric, prompt=text, response=str(row["response"]))
            todo.append((key, prompt, {"prompt": row["prompt"], "response": row["response"]}))
        n_sent = len(todo)
        n_unique = len({k for k, _, _ in items})
        _collect(backend, todo, jlog, parse_score, "score", n_unique, progress, "judge")
        scores = [jlog.get(key).get("score") for key, _, _ in items]
    parsed = [s for s in scores if s is not None]
    n_bad = len(scores) - len(parsed)
    out = {
        "judge": backend.name,
        "mean_score": sum(parsed) / len(parsed) if parsed else None,
        "n_items": len(scores),
        "n_scored": len(parsed),
        "n_unparseable": n_bad,
        "n_requests": n_sent,
        "score_counts": {str(s): parsed.count(s) for s in range(1, 6)},
        "judgements": str(log_path),
    }
    if rows and not parsed:
        log.warning("no judge reply held a readable score (%d unparseable); check that the judge "
                    "model follows the rubric's answer format (a last line 'Score: N')", n_bad)
    return out


_TO_A = {("AB", "1"): "A", ("AB", "2"): "B", ("BA", "1"): "B", ("BA", "2"): "A"}


def pairwise_compare(backend: JudgeBackend, rows_a: Sequence[dict], rows_b: Sequence[dict],
                     log_path: str | Path, template: str, progress: bool = True) -> dict:
    """Win rate of A's responses against B's on the same prompts (matched by prompt text).

    The judge sees each pair twice, A first then B first; A wins when both orders prefer A,
    loses when both prefer B, and ties otherwise (a disagreement is a position effect).
    A comparison with an unparseable verdict in either order is excluded and counted."""
    by_prompt: dict[str, dict] = {}
    for r in rows_b:
        by_prompt.setdefault(str(r["prompt"]), r)
    pairs, n_missing = [], 0
    for a in rows_a:
        b = by_prompt.get(str(a["prompt"]))
        if b is None:
            n_missing += 1
            continue
        pairs.append((a, b))
    if not pairs:
        raise UserError(
            f"pairwise: none of model A's {len(rows_a)} prompts has an answer from model B "
            "(answers are matched by their prompt text); check pairwise.responses_b"
        )
    calls = []  # (key, prompt, record) per comparison and order
    for a, b in pairs:
        text = judge_prompt_text(a)
        ra, rb = str(a["response"]), str(b["response"])
        for order, (r1, r2) in (("AB", (ra, rb)), ("BA", (rb, ra))):
            key = item_key("pairwise", backend.name, template, text, r1, r2)
            prompt = render_prompt(template, prompt=text, response_1=r1, response_2=r2)
            calls.append((key, prompt, {"prompt": a["prompt"], "order": order,
                                        "response_1": r1, "response_2": r2}))
    with JudgementLog(log_path) as jlog:
        seen, todo = set(), []
        for key, prompt, record in calls:
            if key in jlog or key in seen:
                continue
            seen.add(key)
            todo.append((key, prompt, record))
        n_unique = len({k for k, _, _ in calls})
        _collect(backend, todo, jlog, parse_winner, "winner", n_unique, progress, "pairwise")
        verdicts = [jlog.get(key)["winner"] for key, _, _ in calls]
    wins = ties = losses = bad = disagree = 0
    for k in range(len(pairs)):
        v_ab, v_ba = verdicts[2 * k], verdicts[2 * k + 1]
        if v_ab is None or v_ba is None:
            bad += 1
            continue
        p1 = _TO_A.get(("AB", v_ab), "tie")
        p2 = _TO_A.get(("BA", v_ba), "tie")
        if p1 != p2:
            disagree += 1
        if p1 == p2 == "A":
            wins += 1
        elif p1 == p2 == "B":
            losses += 1
        else:
            ties += 1
    n = wins + ties + losses

    def rate(x: int) -> float | None:
        return x / n if n else None

    return {
        "judge": backend.name,
        "win_rate": rate(wins),
        "tie_rate": rate(ties),
        "loss_rate": rate(losses),
        "score": (wins + 0.5 * ties) / n if n else None,  # ties count half
        "wins": wins, "ties": ties, "losses": losses,
        "n_compared": n,
        "n_unparseable": bad,
        "n_order_disagreements": disagree,
        "n_missing_b": n_missing,
        "n_requests": len(todo),
        "judgements": str(log_path),
    }
