"""The HTTP client (api.http_post, api.completions, evaluate.py --api-url) against a scripted
server on 127.0.0.1: torn replies (a truncated body, a status line that is not HTTP, a reset
connection) are retried like a 5xx; Retry-After is honoured, up to a bound; the timeout bounds the
whole reply, a body dripped a byte at a time included; malformed text and fields become error
records; the API key never reaches a record, an error or stderr."""
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import api
import evaluate
from conftest import serve_bounded, write_jsonl
from test_faults import run_main

KEY = "sk-test-0123456789abcdef"


def completion(text, **extra):
    return json.dumps({"choices": [{"text": text, "finish_reason": "stop"}], **extra}).encode()


class Server:
    """OpenAI-compatible POST endpoint on 127.0.0.1 whose replies follow a script: request k gets
    script[k] (the last entry repeats), or, given a dict, the entry of the request's seed. An entry is
    (kind, arg): "ok" a completion, "torn" a body cut short, "badline" a status line that is not HTTP,
    "reset" a TCP reset, "status" (code, headers, body), "drip" a body one byte per 0.2 s, "raw" a 200
    with the given body. Serves at most 50 requests; stops when closed or after 30 s without one."""

    def __init__(self, script):
        self.script, self.requests, self.closed = script, [], False
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, code, body, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((body, self.headers.get("Authorization")))
                s = outer.script
                kind, arg = s.get(body.get("seed"), s.get(None)) if isinstance(s, dict) else \
                    s[min(len(outer.requests), len(s)) - 1]
                if callable(arg):
                    arg = arg(self.headers)
                try:
                    if kind == "ok":
                        self.send(200, completion(arg or "done </think> fine", usage={"completion_tokens": 3}))
                    elif kind == "raw":
                        self.send(200, arg)
                    elif kind == "status":
                        self.send(*arg)
                    elif kind == "torn":  # promises 200 bytes, sends 20, closes
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + completion("x")[:20])
                    elif kind == "badline":
                        self.wfile.write(b"HELLO THERE\r\n\r\n")
                    elif kind == "reset":  # SO_LINGER 0: close sends RST
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                    elif kind == "drip":
                        data = completion("y" * 40)
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                        for i in range(len(data)):
                            if outer.closed:
                                break
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            threading.Event().wait(0.2)
                except OSError:
                    pass  # the client hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.2
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

        self.thread = serve_bounded(self.httpd, lambda: len(self.requests), lambda: self.closed, 50, 30)

    def close(self):
        self.closed = True
        self.thread.join(10)


@pytest.fixture
def serve():
    servers = []

    def make(script):
        servers.append(Server(script))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.fixture
def sleeps(monkeypatch):
    """http_post's waits between tries (called from this test's thread), recorded instead of slept."""
    got, real, me = [], time.sleep, threading.current_thread()
    monkeypatch.setattr(api.time, "sleep", lambda s: got.append(s) if threading.current_thread() is me else real(s))
    return got


@pytest.mark.parametrize("kind", ["torn", "badline", "reset"])
def test_torn_replies_are_retried(kind, serve, sleeps):
    """A truncated body (IncompleteRead), a status line that is not HTTP (BadStatusLine) and a connection
    reset end one try, not the run: the next try gets the reply."""
    s = serve([(kind, None), ("ok", "second try")])
    d = api.http_post(s.url + "/completions", {"seed": 0}, retries=2, backoff=0.01, timeout=10)
    assert d["choices"][0]["text"] == "second try" and len(s.requests) == 2 and sleeps == [0.01]
    s2 = serve([(kind, None)])
    with pytest.raises(api.RequestFailed, match=r"after 2 tries"):
        api.http_post(s2.url + "/completions", {}, retries=1, backoff=0.01, timeout=10)


def test_retry_after_is_honoured_and_bounded(serve, sleeps):
    """503 / 429 with Retry-After: the next try waits what the server asks (seconds or an HTTP date), at
    least the backoff, at most api.RETRY_AFTER_MAX."""
    from email.utils import formatdate
    s = serve([("status", (503, b"busy", [("Retry-After", "2")])),
               ("status", (429, b"slow down", [("Retry-After", "99999")])),
               ("status", (503, b"busy", [("Retry-After", formatdate(time.time() + 30, usegmt=True))])),
               ("status", (503, b"busy", [("Retry-After", "soon")])),
               ("ok", None)])
    api.http_post(s.url + "/completions", {}, retries=4, backoff=0.01, timeout=10)
    assert len(s.requests) == 5 and sleeps[:2] == [2.0, api.RETRY_AFTER_MAX]
    assert 28 <= sleeps[2] <= 30 and sleeps[3] == 0.01 * 2 ** 3  # a date 30 s ahead; unreadable: the backoff


def test_timeout_bounds_the_whole_reply(serve):
    """A body dripped a byte every 0.2 s never trips a per-read timeout: --api-timeout 1 must still end
    the try after about 1 s (without the bound the try lasted the whole ~18 s drip, then succeeded)."""
    s = serve([("drip", None)])
    t0 = time.time()
    with pytest.raises(api.RequestFailed, match="timed out: no complete reply within 1 s"):
        api.http_post(s.url + "/completions", {}, retries=0, timeout=1.0)
    assert time.time() - t0 < 3


def test_malformed_replies_become_error_records(serve):
    """A lone surrogate in the text, a string or negative token count, a text that is not a string: each
    request fails for good with an error (after its retries), none raises; a good reply still gets through."""
    s = serve({0: ("raw", completion("\ud800")), 1: ("raw", completion("ok", usage={"completion_tokens": "7"})),
               2: ("raw", completion("ok", usage={"completion_tokens": -1})), 3: ("raw", completion(None)),
               4: ("raw", b'{"choices": [{"text": "fine"}], "usage": "lots"}'), None: ("ok", "fine </think> 42")})
    outs = api.completions(s.url, [[1, 2]] * 6, model="m", max_new_tokens=4, stop_ids=[0], retries=1,
                               backoff=0.01, workers=2)
    for i in range(5):
        assert "malformed reply" in outs[i]["error"] and "after 2 tries" in outs[i]["error"], outs[i]
    assert "surrogates not allowed" in outs[0]["error"] and "not a token count" in outs[1]["error"]
    assert outs[5] == {"text": "fine </think> 42", "truncated": False, "num_tokens": 3}


def test_secrets_never_written_or_printed(tiny_model, tmp_path, serve, monkeypatch, capsys):
    """A server that echoes the Authorization header (in a 401 body, in a completion, in a 5xx body that
    is retried) and a lone surrogate: evaluate.py --api-url ends with error records (no crash), and the
    key is in no record, no summary, nothing on stdout / stderr; the server did receive it."""
    s = serve({0: ("status", (401, b"bad key: " + KEY.encode(), [])),
               1: ("ok", f"your header was {'Bearer ' + KEY}"),
               2: ("status", (500, b"", [])),
               3: ("raw", completion("\ud800 " + KEY)),
               None: ("raw", lambda h: completion(json.dumps({"echo": h["Authorization"]})))})  # echoes the header
    data = write_jsonl(tmp_path / "m.jsonl", [{"problem": f"{i}*7?", "answer": "42", "unique_id": f"p{i}"}
                                              for i in range(5)])
    out = tmp_path / "eval"
    monkeypatch.setenv("TEST_API_KEY", KEY)
    monkeypatch.setattr(api.time, "sleep", lambda s: None)
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, [
        "--model", tiny_model, "--benchmarks", "math500", "--data", f"math500={data}", "--samples", "1",
        "--api-url", s.url, "--api-model", "tiny", "--api-key-env", "TEST_API_KEY", "--api-retries", "1",
        "--api-workers", "2", "--max-new-tokens", "8", "--out", out])
    assert code == 0, err
    recs = {r["id"]: r for r in map(json.loads, open(out / "math500.jsonl"))}
    assert "HTTP 401" in recs["p0"]["error"] and "[redacted]" in recs["p0"]["error"]
    assert recs["p1"]["completion"] == "your header was Bearer [redacted]"
    assert "HTTP 500" in recs["p2"]["error"] and "malformed reply" in recs["p3"]["error"]
    assert "[redacted]" in recs["p4"]["completion"]
    written = "".join(p.read_text() for p in out.iterdir() if p.is_file())
    for where in (written, stdout, err):
        assert KEY not in where
    assert all(auth == f"Bearer {KEY}" for _, auth in s.requests)
    assert "warning: math500 id p0" in err  # the failures were reported, without the key
