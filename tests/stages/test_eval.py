"""`instructkit eval` end to end on tiny models (CPU, seconds): every task in one run against
an OpenAI-compatible judge server on 127.0.0.1, eval.json / eval.md contents, resume, a down
judge, the local HF judge, and `chat` over piped stdin."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instructkit.config import ModelConfig, RMConfig, load_config
from instructkit.errors import UserError
from instructkit.evaluate.config import EvalConfig
from instructkit.evaluate.run import run

REPO = Path(__file__).resolve().parents[2]


class JudgeServer:
    """A chat-completions server on 127.0.0.1: single-answer prompts get ``Score: 4`` (or no
    score when the answer is empty), pairwise prompts prefer answer 1 (a position bias)."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                msg = body["messages"][-1]["content"]
                if "[Answer 1]" in msg:
                    reply = "Winner: 1"
                else:
                    answer = msg.split("[Answer]\n", 1)[1].split("\n\nExplain", 1)[0]
                    reply = "Score: 4" if answer.strip() else "Nothing to grade."
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    srv = JudgeServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved tiny causal LM (the model evaluated) and a tiny reward model from the rm stage."""
    from instructkit.models import build_tiny_model, save_final, tiny_tokenizer
    from instructkit.stages import rm

    root = tmp_path_factory.mktemp("models")
    lm = save_final(build_tiny_model("tiny-llama", seed=1), tiny_tokenizer(), root / "sft" / "final",
                    ModelConfig(name_or_path="tiny-llama"))
    cfg = load_config(RMConfig, REPO / "configs/tiny/rm.yaml", [
        f"output_dir={root / 'rm'}", f"data.train={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}",
        "train.max_steps=2", "data.max_examples=32", "rm.stats_max_groups=8", "train.eval_every=0",
        "train.save_every=0", "train.eval_at_start=false", "log.tensorboard=false", "model.device=cpu"])
    return {"lm": Path(lm), "rm": Path(rm.run(cfg).final_dir)}


def eval_cfg(tmp_path, models, url, *overrides):
    prompts = tmp_path / "golden.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Name a colour.", "What is 2 + 2?", "Say hello.", "Name a colour."]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Good answer {i}.",
                                         "rejected": f"bad {i}"}) + "\n" for i in range(6)))
    tasks = next((o.split("=", 1)[1].strip("[]").split(",") for o in overrides if o.startswith("tasks=")),
                 ["perplexity", "samples", "judge"])  # configs/eval.yaml's
    sections = {  # each task's settings (a section of a task not run is rejected)
        "perplexity": [f"perplexity.data={REPO / 'data/selfinstruct_seed_tasks.jsonl'}",
                       "perplexity.format=self_instruct", "perplexity.max_examples=12", "perplexity.max_seq_len=128"],
        "reward_accuracy": [f"reward.model={models['rm']}", f"reward.data={pairs}", "reward.format=auto",
                            "reward.max_seq_len=64"],
        "samples": [f"samples.prompts={prompts}", "samples.format=auto", "samples.max_new_tokens=8"],
        "judge": [f"judge.base_url={url}", "judge.model=judge-llm", "judge.retries=0", "judge.backoff_s=0.01",
                  "judge.timeout_s=10"],
    }
    wanted = set(tasks) | ({"samples", "judge"} if {"judge", "pairwise"} & set(tasks) else set())
    base = [f"model={models['lm']}", f"output_dir={tmp_path / 'eval'}", "device=cpu", "progress=false",
            *(o for t in sections if t in wanted for o in sections[t])]
    return load_config(EvalConfig, REPO / "configs/eval.yaml", base + list(overrides))


def test_every_task_then_resume(tmp_path, models, judge_server, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-local-42")
    answers_b = tmp_path / "b.jsonl"
    answers_b.write_text("".join(json.dumps({"prompt": p, "response": f"B says {p}"}) + "\n"
                                 for p in ["Name a colour.", "What is 2 + 2?"]))
    cfg = eval_cfg(tmp_path, models, judge_server.url,
                   "tasks=[perplexity,reward_accuracy,samples,judge,pairwise]",
                   "judge.api_key_env=EVAL_TEST_KEY", f"pairwise.responses_b={answers_b}")
    report = run(cfg)
    out = tmp_path / "eval"
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["model"] == str(models["lm"])
    res = on_disk["results"]
    assert set(res) == {"perplexity", "reward_accuracy", "samples", "judge", "pairwise"}
    assert res["perplexity"]["examples"] == 12 and res["perplexity"]["ppl"] > 1
    assert res["reward_accuracy"]["n_pairs"] == 6 and 0 <= res["reward_accuracy"]["accuracy"] <= 1
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["Name a colour.", "What is 2 + 2?", "Say hello."]
    assert res["samples"]["n"] == 3
    judged = res["judge"]
    n_empty = sum(1 for s in samples if not s["response"].strip())
    assert judged["n_items"] == 3 and judged["n_unparseable"] == n_empty
    assert judged["mean_score"] == (4.0 if n_empty < 3 else None)
    pw = res["pairwise"]  # a judge that always picks position 1: every comparison is a tie
    assert (pw["n_compared"], pw["ties"], pw["n_missing_b"]) == (2, 2, 1)
    assert len(judge_server.requests) == 3 + 4
    assert all(r["auth"] == "Bearer sk-local-42" for r in judge_server.requests)
    assert len((out / "judgements.jsonl").read_text().splitlines()) == 3
    assert len((out / "pairwise.jsonl").read_text().splitlines()) == 4
    for name in ("eval.json", "eval.md", "samples.jsonl", "config.yaml", "judgements.jsonl"):
        assert "sk-local-42" not in (out / name).read_text()
    assert not list(out.glob("*.tmp"))

    md = (out / "eval.md").read_text()
    assert md.startswith(f"# Evaluation of `{models['lm']}`")
    assert "| task | metric | value | source |" in md
    assert f"| perplexity | perplexity | {res['perplexity']['ppl']:.4g} |" in md
    assert f"| reward_accuracy | accuracy | {res['reward_accuracy']['accuracy']:.4f} |" in md
    assert "| samples | responses | 3 |" in md
    assert "| judge | mean score (1-5) |" in md and "| pairwise | tie rate | 1.000 |" in md

    # a second run regenerates the same (greedy) answers and sends nothing to the judge
    again = run(eval_cfg(tmp_path, models, judge_server.url, "tasks=[samples,judge,pairwise]",
                         "judge.api_key_env=EVAL_TEST_KEY", f"pairwise.responses_b={answers_b}"))
    assert len(judge_server.requests) == 7
    assert again["results"]["judge"]["n_requests"] == 0
    assert again["results"]["judge"]["mean_score"] == judged["mean_score"]
    # results of tasks not run this time are kept
    assert again["results"]["perplexity"] == res["perplexity"]


def test_down_judge_is_a_clear_error_and_leaves_no_report(tmp_path, models):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = eval_cfg(tmp_path, models, f"http://127.0.0.1:{port}/v1", "tasks=[samples,judge]",
                   "judge.retries=1")
    with pytest.raises(UserError, match=rf"127.0.0.1:{port}/v1/chat/completions.*not reachable.*start"):
        run(cfg)
    out = tmp_path / "eval"
    assert not (out / "eval.json").exists() and not (out / "eval.md").exists()
    assert not list(out.glob("*.tmp"))
    assert (out / "samples.jsonl").exists()  # complete: written before the judge ran


def test_judge_given_answers_without_a_model(tmp_path, judge_server):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "Hi", "response": "Hello!"}) + "\n")
    cfg = load_config(EvalConfig, None, ["tasks=[judge]", f"judge.responses={answers}",
                                         f"judge.base_url={judge_server.url}", "judge.model=j",
                                         f"output_dir={tmp_path / 'o'}", "progress=false"])
    report = run(cfg)
    assert report["results"]["judge"]["mean_score"] == 4.0 and len(judge_server.requests) == 1


def test_pairwise_against_model_b(tmp_path, models, judge_server):
    cfg = eval_cfg(tmp_path, models, judge_server.url, "tasks=[pairwise]", "pairwise.model_b=tiny-llama")
    report = run(cfg)
    rows_b = (tmp_path / "eval" / "samples_b.jsonl").read_text().splitlines()
    assert len(rows_b) == 3 and report["results"]["pairwise"]["n_compared"] == 3


def test_tiny_config_with_a_local_hf_judge(tmp_path):
    cfg = load_config(EvalConfig, REPO / "configs/tiny/eval.yaml",
                      [f"output_dir={tmp_path / 'e'}", f"perplexity.data={REPO / 'data/selfinstruct_seed_tasks.jsonl'}",
                       f"samples.prompts={REPO / 'data/selfinstruct_seed_tasks.jsonl'}"])
    report = run(cfg)
    judge = report["results"]["judge"]
    assert judge["judge"] == "hf:tiny-llama" and judge["n_items"] == 4
    assert judge["n_scored"] + judge["n_unparseable"] == 4  # a random model: mostly unparseable
    again = run(cfg)
    assert again["results"]["judge"]["n_requests"] == 0


# --------------------------------------------------------------------------- chat


def test_chat_keeps_history_and_streams(models):
    from instructkit.evaluate.chat import chat
    from instructkit.models import load_for_inference

    model, tok = load_for_inference(models["lm"], device="cpu")
    prompts = []
    original = model.generate

    def spy(**kw):
        prompts.append(tok.decode(kw["input_ids"][0]))
        return original(**kw)

    model.generate = spy
    out = io.StringIO()
    history = chat(model=model, tokenizer=tok, system_prompt="Be brief.", max_new_tokens=5,
                   temperature=0, stdin=io.StringIO("first question\n\nsecond question\n"), stdout=out)
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert "first question" in prompts[1] and "second question" in prompts[1]
    assert "Be brief." in prompts[0] and "<|im_start|>assistant" in prompts[0]  # the chat template
    for m in history[2::2]:
        assert m["content"] in out.getvalue()  # streamed to the output

    out = io.StringIO()
    history = chat(model=model, tokenizer=tok, max_new_tokens=5, temperature=0,
                   stdin=io.StringIO("one\n/reset\ntwo\n/exit\nthree\n"), stdout=out)
    assert "(history cleared)" in out.getvalue()
    assert [m["content"] for m in history if m["role"] == "user"] == ["two"]
    assert "one" not in prompts[-1] and "three" not in prompts[-1]


def test_chat_drops_an_interrupted_question_and_goes_on(models):
    """Ctrl-C during an answer ends that answer only: the question leaves the history (the next
    prompt does not hold it) and the session reads the next line."""
    from instructkit.evaluate.chat import chat
    from instructkit.models import load_for_inference

    model, tok = load_for_inference(models["lm"], device="cpu")
    prompts, original = [], model.generate

    def interrupt_first(**kw):
        prompts.append(tok.decode(kw["input_ids"][0]))
        if len(prompts) == 1:
            raise KeyboardInterrupt
        return original(**kw)

    model.generate = interrupt_first
    out = io.StringIO()
    history = chat(model=model, tokenizer=tok, max_new_tokens=3, temperature=0,
                   stdin=io.StringIO("lost question\nkept question\n"), stdout=out)
    assert "(interrupted)" in out.getvalue()
    assert [m["content"] for m in history if m["role"] == "user"] == ["kept question"]
    assert "lost question" in prompts[0] and "lost question" not in prompts[1]
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_chat_over_piped_stdin(models):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit", "chat", str(models["lm"]), "--temperature", "0",
         "--max-new-tokens", "6", "--device", "cpu"],
        input="Hello there\n/reset\nTell me a joke\n/exit\n", capture_output=True, text=True,
        timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "(history cleared)" in lines and len(lines) >= 3


def test_chat_bad_model_is_a_user_error(capsys):
    from instructkit.cli import main

    assert main(["chat", str(REPO / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instructkit chat: error:") and "no-such-model" in err


@pytest.mark.parametrize("argv, fragment", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1: must be 0 (greedy) or above"),
    (["--top-p", "1.5"], "--top-p 1.5: must be above 0 and at most 1"),
    (["--top-k", "-3"], "--top-k -3: must be 0 (off) or above"),
    (["--repetition-penalty", "-1"], "--repetition-penalty -1: must be above 0 (1: off)"),
])
def test_chat_checks_sampling_like_generate_before_loading(capsys, argv, fragment):
    """chat checked --max-new-tokens and --temperature only after loading the model, in words of
    its own, and not --top-p at all; it now shares generate's check (the model here does not exist:
    the sampling error must come first)."""
    from instructkit.cli import main

    assert main(["chat", str(REPO / "no-such-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "no-such-model" not in err, err
