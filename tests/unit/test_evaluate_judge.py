"""LLM-as-judge against a small OpenAI-compatible HTTP server on 127.0.0.1 started by the test:
score parsing, the Authorization header, unparseable replies, resume, retries, a down or
broken endpoint, concurrency, and pairwise comparisons with position swapping."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instructkit.errors import ConfigError, UserError
from instructkit.evaluate import judge as J


class FakeJudge:
    """A chat-completions server: ``reply(user_message) -> str`` (the assistant's content) or
    ``(status, raw_body)``. Records every request (path, Authorization header, JSON body)."""

    def __init__(self, reply, delay: float = 0.0):
        self.reply, self.delay = reply, delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "body": body})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if outer.delay:
                        time.sleep(outer.delay)
                    r = outer.reply(body["messages"][-1]["content"])
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                if isinstance(r, tuple):
                    status, raw = r
                else:
                    status = 200
                    raw = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": r},
                         "finish_reason": "stop"}]})
                data = raw.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def answer_of(message: str) -> str:
    """The answer inside a rendered rubric prompt."""
    return message.split("[Answer]\n", 1)[1].split("\n\n", 1)[0]


def canned(message: str) -> str:
    a = answer_of(message)
    if a.startswith("answer-"):
        return f"The answer is fine.\nScore: {a.split('-')[1]}"
    return "I liked it a lot!"  # no score: unparseable


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def backend(url, **kw):
    kw.setdefault("retries", 0)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 10)
    return J.OpenAIJudge(url, kw.pop("model", "judge-model"), **kw)


ROWS = [{"prompt": "Say five.", "response": "answer-5"},
        {"prompt": "Say three.", "response": "answer-3"},
        {"prompt": "Say nothing.", "response": "rambling"}]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply, score", [
    ("Good.\nScore: 4", 4), ("score:5", 5), ("**Score:** 3", 3), ("Score: 2/5", 2),
    ("Score = 1 out of 5", 1), ('{"score": 4, "reason": "ok"}', 4), ("3", 3), (" 5. ", 5),
    ("Score: 3\nOn reflection...\nScore: 4", 4),  # the last one counts
    ("Score: 7", None), ("Score: 0", None), ("Score: 3.5", None), ("It is great", None),
    ("", None), (None, None), ("I give it 4 stars", None),
])
def test_parse_score(reply, score):
    assert J.parse_score(reply) == score


@pytest.mark.parametrize("reply, winner", [
    ("Answer 1 is better.\nWinner: 1", "1"), ("Winner: 2", "2"), ("winner: tie", "tie"),
    ("**Winner:** Answer 2", "2"), ('{"winner": "1"}', "1"), ("Winner: B", "2"), ("2", "2"),
    ("Both are fine.", None), ("", None),
])
def test_parse_winner(reply, winner):
    assert J.parse_winner(reply) == winner


def test_shipped_prompt_files_and_rendering(tmp_path):
    rubric = J.load_prompt_template(None, "rubric")
    assert "<!--" not in rubric and "Score: N" in rubric
    assert "{prompt}" in rubric and "{response}" in rubric
    pair = J.load_prompt_template(None, "pairwise")
    assert "{response_1}" in pair and "Winner: tie" in pair
    # texts with braces and placeholder-like words are inserted verbatim, in one pass
    out = J.render_prompt("Q: {prompt}\nA: {response}\nJSON: {\"score\": 4}",
                          prompt="use {response} here", response="x = {a: 1}")
    assert out == "Q: use {response} here\nA: x = {a: 1}\nJSON: {\"score\": 4}"
    bad = tmp_path / "bad.md"
    bad.write_text("Grade this: {prompt}")
    with pytest.raises(ConfigError, match=r"judge.rubric_path.*\{response\}"):
        J.load_prompt_template(bad, "rubric")
    with pytest.raises(ConfigError, match="cannot read"):
        J.load_prompt_template(tmp_path / "missing.md", "rubric")


# --------------------------------------------------------------------------- scoring


def test_judge_scores_with_key_from_env_and_counts_unparseable(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    rubric = J.load_prompt_template(None, "rubric")
    with FakeJudge(canned) as srv:
        b = backend(srv.url, api_key_env="MY_JUDGE_KEY")
        assert "sk-test-123" not in repr(b)
        res = J.judge_responses(b, ROWS, tmp_path / "j.jsonl", rubric, progress=False)
    assert res["mean_score"] == pytest.approx(4.0)  # (5 + 3) / 2: the garbage reply is left out
    assert (res["n_items"], res["n_scored"], res["n_unparseable"], res["n_requests"]) == (3, 2, 1, 3)
    assert res["score_counts"] == {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}
    assert len(srv.requests) == 3
    for r in srv.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["auth"] == "Bearer sk-test-123"
        assert r["body"]["model"] == "judge-model" and r["body"]["temperature"] == 0
        assert r["body"]["messages"][0]["role"] == "user"
    assert any("[Instruction]\nSay five." in r["body"]["messages"][0]["content"] for r in srv.requests)
    logged = [json.loads(l) for l in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert sorted(str(r["score"]) for r in logged) == ["3", "5", "None"]
    assert "sk-test-123" not in (tmp_path / "j.jsonl").read_text()
    assert "sk-test-123" not in json.dumps(res)


def test_no_key_no_header_and_missing_env_var(tmp_path, monkeypatch):
    rubric = J.load_prompt_template(None, "rubric")
    with FakeJudge(canned) as srv:
        J.judge_responses(backend(srv.url), ROWS[:1], tmp_path / "j.jsonl", rubric, progress=False)
        assert srv.requests[0]["auth"] is None
    monkeypatch.delenv("NOT_SET_KEY_VAR", raising=False)
    with pytest.raises(UserError, match="NOT_SET_KEY_VAR.*not set"):
        backend("http://127.0.0.1:1/v1", api_key_env="NOT_SET_KEY_VAR")


def test_resume_sends_only_what_the_log_lacks(tmp_path):
    rubric = J.load_prompt_template(None, "rubric")
    path = tmp_path / "j.jsonl"
    with FakeJudge(canned) as srv:
        first = J.judge_responses(backend(srv.url), ROWS[:2], path, rubric, progress=False)
        assert len(srv.requests) == 2
        again = J.judge_responses(backend(srv.url), ROWS[:2], path, rubric, progress=False)
        assert len(srv.requests) == 2 and again["n_requests"] == 0
        assert again["mean_score"] == first["mean_score"]
        # a crash left half a line behind: it is dropped, the item is judged again
        text = path.read_text()
        path.write_text(text + text.splitlines()[0][:20])
        more = J.judge_responses(backend(srv.url), ROWS, path, rubric, progress=False)
        assert len(srv.requests) == 3 and more["n_requests"] == 1  # only the new row
        assert all(json.loads(l) for l in path.read_text().splitlines())
        # another rubric or another judge model: judged again
        J.judge_responses(backend(srv.url), ROWS[:1], path, rubric + "\nBe brief.", progress=False)
        J.judge_responses(backend(srv.url, model="other"), ROWS[:1], path, rubric, progress=False)
        assert len(srv.requests) == 5


def test_all_garbage_is_counted_not_a_crash(tmp_path):
    rubric = J.load_prompt_template(None, "rubric")
    with FakeJudge(lambda m: "What a lovely answer.") as srv:
        res = J.judge_responses(backend(srv.url), ROWS, tmp_path / "j.jsonl", rubric, progress=False)
    assert res["mean_score"] is None and res["n_unparseable"] == 3 and res["n_scored"] == 0


def test_concurrency(tmp_path):
    rubric = J.load_prompt_template(None, "rubric")
    rows = [{"prompt": f"p{i}", "response": "answer-4"} for i in range(8)]
    with FakeJudge(canned, delay=0.3) as srv:
        res = J.judge_responses(backend(srv.url, concurrency=4), rows, tmp_path / "j.jsonl", rubric,
                                progress=False)
    assert res["n_scored"] == 8 and 1 < srv.max_in_flight <= 4  # in parallel, never above judge.concurrency


def test_retries_server_errors_then_succeeds(tmp_path):
    calls = []

    def flaky(message):
        calls.append(1)
        return (503, '{"error": "loading model"}') if len(calls) <= 2 else "Score: 5"

    with FakeJudge(flaky) as srv:
        assert backend(srv.url, retries=2).complete("hi") == "Score: 5"
    assert len(calls) == 3


def test_down_endpoint_is_a_user_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    b = backend(url, retries=1)
    with pytest.raises(UserError) as e:
        J.judge_responses(b, ROWS, "/dev/null", J.load_prompt_template(None), progress=False)
    msg = str(e.value)
    assert f"{url}/chat/completions" in msg and "not reachable" in msg and "start" in msg
    assert "2 attempt" in msg


@pytest.mark.parametrize("status, raw, fragment", [
    (401, '{"error": "invalid api key"}', "api_key_env"),
    (404, '{"error": "model \\"judge-model\\" not found"}', "judge.model"),
    (200, "<html>Hello from a web server</html>", "not a chat-completions response"),
    (200, '{"result": "ok"}', "not a chat-completions response"),
    (500, "Internal Server Error", "HTTP 500"),
])
def test_broken_endpoint_answers_are_user_errors(tmp_path, status, raw, fragment):
    with FakeJudge(lambda m: (status, raw)) as srv:
        with pytest.raises(UserError, match=re.escape(fragment)) as e:
            J.judge_responses(backend(srv.url, retries=1), ROWS[:1], tmp_path / "j.jsonl",
                              J.load_prompt_template(None), progress=False)
    assert srv.url in str(e.value)
    # client errors are not retried; garbage and 5xx are
    assert len(srv.requests) == (1 if 400 <= status < 500 else 2)


def test_timeout_is_retried_then_reported(tmp_path):
    with FakeJudge(lambda m: "Score: 3", delay=1.0) as srv:
        with pytest.raises(UserError, match="timeout_s"):
            backend(srv.url, timeout_s=0.2, retries=1).complete("hi")


def test_a_failure_keeps_what_was_judged(tmp_path):
    """An endpoint that dies halfway: the judgements that arrived are in the log."""
    def half(message):
        return "Score: 4" if "answer-" in answer_of(message) else (400, '{"error": "bad request"}')

    rows = [{"prompt": f"p{i}", "response": f"answer-{1 + i % 5}"} for i in range(4)] + [
        {"prompt": "last", "response": "boom"}]
    with FakeJudge(half) as srv:
        with pytest.raises(UserError):
            J.judge_responses(backend(srv.url, concurrency=1), rows, tmp_path / "j.jsonl",
                              J.load_prompt_template(None), progress=False)
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 4


# --------------------------------------------------------------------------- pairwise


def sections(message: str) -> tuple[str, str]:
    one = message.split("[Answer 1]\n", 1)[1].split("\n\n[Answer 2]", 1)[0]
    two = message.split("[Answer 2]\n", 1)[1].split("\n\n", 1)[0]
    return one, two


def prefers_marker(message: str) -> str:
    one, two = sections(message)
    if "GOOD" in one and "GOOD" not in two:
        return "Answer 1 is better.\nWinner: 1"
    if "GOOD" in two and "GOOD" not in one:
        return "Answer 2 is better.\nWinner: 2"
    return "Winner: tie"


A = [{"prompt": f"q{i}", "response": f"GOOD answer {i}"} for i in range(4)]
B = [{"prompt": f"q{i}", "response": f"meh answer {i}"} for i in range(3)]  # q3 has no B answer


def test_pairwise_position_bias_gives_ties(tmp_path):
    tmpl = J.load_prompt_template(None, "pairwise")
    with FakeJudge(lambda m: "Winner: 1") as srv:
        res = J.pairwise_compare(backend(srv.url), A, B, tmp_path / "p.jsonl", tmpl, progress=False)
    assert len(srv.requests) == 6  # 3 comparisons x 2 orders
    assert (res["wins"], res["ties"], res["losses"]) == (0, 3, 0)
    assert res["tie_rate"] == 1.0 and res["n_order_disagreements"] == 3 and res["n_missing_b"] == 1


def test_pairwise_marker_preference_gives_wins_and_losses(tmp_path):
    tmpl = J.load_prompt_template(None, "pairwise")
    with FakeJudge(prefers_marker) as srv:
        res = J.pairwise_compare(backend(srv.url), A, B, tmp_path / "p.jsonl", tmpl, progress=False)
        assert (res["win_rate"], res["loss_rate"], res["n_compared"]) == (1.0, 0.0, 3)
        assert res["score"] == 1.0 and res["n_order_disagreements"] == 0
        orders = [sections(r["body"]["messages"][0]["content"]) for r in srv.requests]
        assert sum("GOOD" in one for one, _ in orders) == 3  # A shown first in half the calls
        # resume: nothing is sent again
        again = J.pairwise_compare(backend(srv.url), A, B, tmp_path / "p.jsonl", tmpl, progress=False)
        assert len(srv.requests) == 6 and again["n_requests"] == 0 and again["wins"] == 3
        # B is the better one: losses
        res = J.pairwise_compare(backend(srv.url), B, A, tmp_path / "p2.jsonl", tmpl, progress=False)
        assert (res["wins"], res["losses"], res["n_missing_b"]) == (0, 3, 0)


def test_pairwise_unparseable_is_excluded(tmp_path):
    tmpl = J.load_prompt_template(None, "pairwise")

    def sometimes(message):
        one, _ = sections(message)
        return "no idea" if one.endswith(" 0") else prefers_marker(message)

    with FakeJudge(sometimes) as srv:
        res = J.pairwise_compare(backend(srv.url), A, B, tmp_path / "p.jsonl", tmpl, progress=False)
    assert res["n_unparseable"] == 1 and res["n_compared"] == 2 and res["win_rate"] == 1.0
    with pytest.raises(UserError, match="pairwise.responses_b"):
        J.pairwise_compare(backend("http://127.0.0.1:1/v1"), A, [{"prompt": "zzz", "response": "x"}],
                           tmp_path / "p3.jsonl", tmpl, progress=False)


# --------------------------------------------------------------------------- secrets


def test_a_server_echoing_the_key_does_not_put_it_on_stderr(tmp_path, monkeypatch):
    """A proxy that answers 401 or garbage with the request's headers in its body: the
    snippet quoted in the error shows the reply with the key masked."""
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-live-abcdef123456")
    echo = 'rejected: {"Authorization": "Bearer sk-live-abcdef123456", "key": "sk-live-abcdef123456"}'
    for status in (401, 200, 503):
        with FakeJudge(lambda m: (status, echo)) as srv:
            with pytest.raises(UserError) as e:
                backend(srv.url, api_key_env="MY_JUDGE_KEY").complete("hi")
        msg = str(e.value)
        assert "sk-live-abcdef123456" not in msg and "rejected" in msg and "***" in msg, msg


def test_credentials_in_base_url_are_basic_auth_and_never_shown(tmp_path):
    import base64

    rubric = J.load_prompt_template(None, "rubric")
    with FakeJudge(canned) as srv:
        url = srv.url.replace("http://", "http://alice:s3cr%40t@")
        b = backend(url)
        assert "s3cr" not in repr(b) and "s3cr" not in b.name and "alice" not in b.url
        res = J.judge_responses(b, ROWS[:1], tmp_path / "j.jsonl", rubric, progress=False)
        assert res["n_scored"] == 1
        assert srv.requests[0]["auth"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
        assert srv.requests[0]["path"] == "/v1/chat/completions"
    assert "s3cr" not in (tmp_path / "j.jsonl").read_text() and "s3cr" not in json.dumps(res)
    down = f"http://alice:s3cr%40t@127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError) as e:
        backend(down).complete("hi")
    assert "s3cr" not in str(e.value) and "not reachable" in str(e.value)
