"""experiments/vllm/serving_load.py (soak.py's and pressure.py's pieces) against a loopback HTTP server
that imitates vLLM's /v1/completions: the request mix, the answer checker and its failure reports.
No vLLM: the fake server runs in a thread on 127.0.0.1, port 0.  pytest.ini puts experiments/vllm on
the path."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import serving_load as sl

MAX_LEN, VOCAB = 512, 1000


def test_mix_lengths_span_the_range_and_fit_the_context():
    reqs = sl.make_mix(60, max_model_len=MAX_LEN, vocab_size=VOCAB, seed=3, max_new=64)
    good = [r for r in reqs if r.kind == "good"]
    assert len(good) == 60
    assert all(len(r.body["prompt"]) == r.prompt_len for r in good)
    assert all(r.prompt_len >= 16 and r.prompt_len + r.max_tokens <= MAX_LEN for r in good)
    assert min(r.prompt_len for r in good) == 16 and max(r.prompt_len + r.max_tokens for r in good) == MAX_LEN
    assert {1, 64} <= {r.max_tokens for r in good} and all(1 <= r.max_tokens <= 64 for r in good)
    assert all(3 <= t < VOCAB for r in good for t in r.body["prompt"])
    assert all(r.body["ignore_eos"] for r in good)
    temps = [r.body["temperature"] for r in good]
    assert 0.0 in temps and any(t > 0 for t in temps)  # greedy and sampled
    assert all("seed" in r.body for r in good if r.body["temperature"] > 0)
    greedy = sl.make_mix(20, max_model_len=MAX_LEN, vocab_size=VOCAB, malformed_each=0, greedy_frac=1.0)
    assert all(r.kind == "good" and r.body["temperature"] == 0.0 for r in greedy)


def test_mix_has_each_malformed_kind_with_its_defect():
    reqs = sl.make_mix(10, max_model_len=MAX_LEN, vocab_size=VOCAB, seed=1, malformed_each=3)
    by_kind: dict[str, list] = {}
    for r in reqs:
        by_kind.setdefault(r.kind, []).append(r.body)
    assert {k: len(v) for k, v in by_kind.items() if k != "good"} == dict.fromkeys(sl.MALFORMED, 3)
    assert all(len(b["prompt"]) > MAX_LEN for b in by_kind["over_long"])
    assert all(b["max_tokens"] < 0 for b in by_kind["negative_max_tokens"])
    assert all(len(b["prompt"]) == 0 for b in by_kind["empty_prompt"])
    t = [b["temperature"] for b in by_kind["bad_temperature"]]
    assert all(not isinstance(x, float) or x < 0 for x in t)
    assert all(max(b["prompt"]) >= VOCAB for b in by_kind["oov_high"])
    assert all(min(b["prompt"]) < 0 for b in by_kind["oov_negative"])
    assert set(sl.MALFORMED) >= sl.LAST


def test_mix_is_deterministic_by_seed():
    def bodies(seed):
        return [(r.kind, r.body) for r in sl.make_mix(30, max_model_len=MAX_LEN, vocab_size=VOCAB, seed=seed)]

    assert bodies(7) == bodies(7)
    assert bodies(7) != bodies(8)


@pytest.mark.parametrize(
    "kw",
    [dict(n_good=1), dict(malformed_each=-1), dict(max_model_len=200, max_new=256), dict(vocab_size=2)],
    ids=["one-good", "negative-malformed", "context-too-short", "tiny-vocab"],
)
def test_mix_rejects_bad_arguments(kw):
    args = dict(n_good=10, max_model_len=MAX_LEN, vocab_size=VOCAB) | kw
    n = args.pop("n_good")
    with pytest.raises(ValueError, match=r"must|need"):
        sl.make_mix(n, **args)


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers like vLLM's OpenAI server with a token-id prompt; ``fault`` breaks it on purpose."""

    fault = ""
    seen = 0
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        b = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        p, n, t = b.get("prompt"), b.get("max_tokens", 16), b.get("temperature", 1.0)
        bad = (not p or not isinstance(n, int) or n < 1 or not isinstance(t, (int, float)) or t < 0
               or len(p) + n > MAX_LEN or min(p) < 0 or max(p) >= VOCAB)  # fmt: skip
        with self.lock:
            type(self).seen += 1
            first_good = not bad and not getattr(type(self), "_dropped", False)
            if first_good and self.fault == "drop":
                type(self)._dropped = True
                self.close_connection = True
                return  # no response at all
        if bad:
            self._send(500 if self.fault == "500_on_bad" else 400, {"error": {"message": "bad request"}})
            return
        k = n - 1 if self.fault == "short" and n > 1 else n
        reason = "stop" if self.fault == "stop" else "length"
        self._send(200, {"choices": [{"index": 0, "text": "", "finish_reason": reason, "token_ids": [5] * k}],
                         "usage": {"prompt_tokens": len(p), "completion_tokens": k}})  # fmt: skip


class LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 256  # every request connects at once (the default backlog of 5 drops some)
    daemon_threads = True


@pytest.fixture
def fake():
    def start(fault: str = ""):
        handler = type("Handler", (FakeVLLM,), {"fault": fault, "seen": 0})
        srv = LoopbackServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    servers: list[LoopbackServer] = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def mix():
    return sl.make_mix(24, max_model_len=MAX_LEN, vocab_size=VOCAB, seed=0, max_new=32)


def test_honest_server_passes_every_check(fake):
    url, handler = fake()
    reqs = mix()
    answers = sl.send_all(url, reqs, timeout=30)
    assert handler.seen == len(reqs)
    rep = sl.check(reqs, answers)
    assert rep["all_ok"], rep["problems"]
    assert rep["good_full"] == rep["good_sent"] == 24
    assert rep["bad_4xx"] == rep["bad_sent"] == 2 * len(sl.MALFORMED)
    assert sl.get(url + "/health")[0] == 200
    assert all(
        len(sl.completion_ids(a)) == r.max_tokens
        for r, a in zip(reqs, answers, strict=False)
        if r.kind == "good"
    )


@pytest.mark.parametrize(
    ("fault", "kind", "says"),
    [("short", "good", "completion tokens, expected"), ("stop", "good", "finish_reason 'stop'"),
     ("500_on_bad", "over_long", "HTTP 500, expected a 4xx"), ("drop", "good", "no answer")],
)  # fmt: skip
def test_faulty_server_is_reported(fake, fault, kind, says):
    url, _ = fake(fault)
    reqs = mix()
    rep = sl.check(reqs, sl.send_all(url, reqs, timeout=30))
    assert not rep["all_ok"]
    assert any(p["kind"] == kind and says in p["problem"] for p in rep["problems"]), rep["problems"]
    if fault == "drop":
        assert len(rep["problems"]) == 1 and rep["good_full"] == rep["good_sent"] - 1


def test_missing_answers_are_reported():
    reqs = mix()
    ok = sl.Answer(400, {"error": {}})
    rep = sl.check(reqs, [ok] * 3)  # the rest never came back
    assert not rep["all_ok"]
    assert sum("never sent" in p["problem"] for p in rep["problems"]) == len(reqs) - 3


def test_unreachable_server_is_no_answer():
    with ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM) as srv:
        port = srv.server_address[1]  # closed again: nothing listens there
    a = sl.post_json(f"http://127.0.0.1:{port}/v1/completions", {"prompt": [5]}, timeout=5)
    assert a.status is None and a.error
    assert sl.problem(sl.Request("good", {}, 1, 1), a).startswith("no answer")
    assert sl.get(f"http://127.0.0.1:{port}/health")[0] is None


def test_compare_ids_counts_and_locates_divergence():
    ref = [[1, 2, 3], [4, 5], [6], [7, 8]]
    got = [[1, 2, 3], [4, 9], None, [7, 8, 9]]
    c = sl.compare_ids(ref, got)
    assert c["differ"] == 3 and c["compared"] == 4
    assert c["first_divergence"] == {1: 1, 2: 0, 3: 2}
    with pytest.raises(ValueError, match="reference outputs"):
        sl.compare_ids(ref, got[:2])


def test_log_and_metrics_parsing():
    log = "x\n(EngineCore) INFO [kv_cache_utils.py:1] GPU KV cache size: 1,234,560 tokens, Maximum concurrency\n"
    assert sl.kv_cache_tokens(log) == 1234560 and sl.kv_cache_tokens("nothing") is None
    text = ('# TYPE vllm:num_preemptions_total counter\nvllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
            'vllm:num_preemptions_total{engine="1",model_name="m"} 4.0\nvllm:num_requests_running{a="b"} 9.0\n')  # fmt: skip
    assert sl.metric_sum(text, "vllm:num_preemptions") == 7.0
    assert sl.metric_sum(text, "vllm:num_requests_running") == 9.0 and sl.metric_sum(text, "vllm:x") == 0


def test_server_that_exits_is_not_healthy(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with sl.Server(cmd, tmp_path / "s.log", port=9, env=None) as srv:
        assert not srv.wait_healthy(timeout=20)
    assert srv.returncode == 3 and "boom" in (tmp_path / "s.log").read_text()


def test_serve_cmd_entries():
    cli = sl.serve_cmd("py", "/m", 8011, 512, ["--x"])
    assert cli[:5] == ["py", "-m", "vllm.entrypoints.cli.main", "serve", "/m"] and cli[-1] == "--x"
    assert "--skip-tokenizer-init" in cli and cli[cli.index("--max-model-len") + 1] == "512"
    api = sl.serve_cmd("py", "/m", 8011, 512, [], entry="api_server")
    assert api[2:5] == ["vllm.entrypoints.openai.api_server", "--model", "/m"]
    with pytest.raises(ValueError, match="entry must be"):
        sl.serve_cmd("py", "/m", 8011, 512, [], entry="serve")
