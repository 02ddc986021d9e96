"""The JSON POST (transport.http_post) against a scripted server on 127.0.0.1: torn replies (a truncated body,
a status line that is not HTTP, a reset connection) are retried like a 5xx; Retry-After is honoured, up to a bound;
the timeout bounds the whole reply, a body dripped a byte at a time included. tests/test_api.py uses the same
server for the OpenAI-compatible requests."""
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import transport
from conftest import serve_bounded


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
    monkeypatch.setattr(transport.time, "sleep",
                        lambda s: got.append(s) if threading.current_thread() is me else real(s))
    return got


@pytest.mark.parametrize("kind", ["torn", "badline", "reset"])
def test_torn_replies_are_retried(kind, serve, sleeps):
    """A truncated body (IncompleteRead), a status line that is not HTTP (BadStatusLine) and a connection
    reset end one try, not the run: the next try gets the reply."""
    s = serve([(kind, None), ("ok", "second try")])
    d = transport.http_post(s.url + "/completions", {"seed": 0}, retries=2, backoff=0.01, timeout=10)
    assert d["choices"][0]["text"] == "second try" and len(s.requests) == 2 and sleeps == [0.01]
    s2 = serve([(kind, None)])
    with pytest.raises(transport.RequestFailed, match=r"after 2 tries"):
        transport.http_post(s2.url + "/completions", {}, retries=1, backoff=0.01, timeout=10)


def test_retry_after_is_honoured_and_bounded(serve, sleeps):
    """503 / 429 with Retry-After: the next try waits what the server asks (seconds or an HTTP date), at
    least the backoff, at most transport.RETRY_AFTER_MAX."""
    from email.utils import formatdate
    s = serve([("status", (503, b"busy", [("Retry-After", "2")])),
               ("status", (429, b"slow down", [("Retry-After", "99999")])),
               ("status", (503, b"busy", [("Retry-After", formatdate(time.time() + 30, usegmt=True))])),
               ("status", (503, b"busy", [("Retry-After", "soon")])),
               ("ok", None)])
    transport.http_post(s.url + "/completions", {}, retries=4, backoff=0.01, timeout=10)
    assert len(s.requests) == 5 and sleeps[:2] == [2.0, transport.RETRY_AFTER_MAX]
    assert 28 <= sleeps[2] <= 30 and sleeps[3] == 0.01 * 2 ** 3  # a date 30 s ahead; unreadable: the backoff


def test_timeout_bounds_the_whole_reply(serve):
    """A body dripped a byte every 0.2 s never trips a per-read timeout: --api-timeout 1 must still end
    the try after about 1 s (without the bound the try lasted the whole ~18 s drip, then succeeded)."""
    s = serve([("drip", None)])
    t0 = time.time()
    with pytest.raises(transport.RequestFailed, match="timed out: no complete reply within 1 s"):
        transport.http_post(s.url + "/completions", {}, retries=0, timeout=1.0)
    assert time.time() - t0 < 3


def test_safe_url_hides_a_password():
    """A URL as evaluate.py prints or writes it (the --api-url server, the judge) keeps all but a password."""
    assert transport.safe_url("http://me:s3cret@host:8000/v1") == "http://me:[redacted]@host:8000/v1"
    assert transport.safe_url("https://api.example.com/v1") == "https://api.example.com/v1"
    assert transport.safe_url(None) is None
