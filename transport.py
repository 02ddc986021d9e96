"""One JSON POST that survives a flaky server: nothing here changes a number. http_post retries with backoff
(or the server's Retry-After), bounds the whole exchange (a reply dripped a byte at a time included) and treats a
torn or malformed reply like a 5xx; RequestFailed exits 2; the API key never reaches a record, an error or the
terminal (redact). api.py sends the OpenAI-compatible requests through it.
"""
import contextlib
import email.utils
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from errors import UsageError


class RequestFailed(UsageError):
    """An HTTP request that failed for good (after its retries, or a 4xx that retrying cannot fix)."""


RETRY_AFTER_MAX = 60.0  # seconds: a server's Retry-After is honoured up to this


def redact(text, key):
    """`text` (str or bytes) with the API key, as sent and as a JSON body escapes it, replaced by [redacted]
    (a server may echo the request: a 401 body, a proxy's error page, the "Bearer KEY" header)."""
    if not key:
        return text
    for k in dict.fromkeys((key, json.dumps(key)[1:-1])):
        text = text.replace(k.encode(), b"[redacted]") if isinstance(text, bytes) else text.replace(k, "[redacted]")
    return text


def safe_url(url):
    """A URL as it may be printed or written: a password in it (http://user:PASSWORD@host) replaced."""
    u = urllib.parse.urlsplit(url or "")
    return url if u.password is None else url.replace(f":{u.password}@", ":[redacted]@", 1)


def _retry_after(headers):
    """Seconds a Retry-After header asks for (a number or an HTTP date) within [0, RETRY_AFTER_MAX]; else None."""
    v = headers.get("Retry-After") if headers is not None else None
    if not v:
        return None
    try:
        s = float(v)
    except ValueError:
        try:
            s = email.utils.parsedate_to_datetime(v).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return None if s != s else min(max(s, 0.0), RETRY_AFTER_MAX)


@contextlib.contextmanager
def _deadline(seconds):
    """-> (opener, fired): a urllib opener whose connections end `seconds` after the start, whatever they are
    doing (urllib's timeout bounds each socket operation, so a reply dripped a byte at a time never times
    out): a timer shuts each connection's socket down, which ends the read waiting on it; `fired` is
    non-empty once it has."""
    socks, fired, lock = [], [], threading.Lock()

    def cut():  # at `seconds`, and for a socket connected after that
        with lock:
            fired.append(True)
            for sock in socks:
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)

    def watched(base):  # an http.client connection that hands its socket to the timer once connected
        class Watched(base):
            def connect(self):
                super().connect()
                with lock:
                    socks.append(self.sock)
                if fired:
                    cut()
        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield urllib.request.build_opener(HTTP, HTTPS), fired
    finally:
        timer.cancel()


def http_post(url, body, key=None, retries=5, backoff=1.0, timeout=3600, parse=None):
    """POST JSON -> parse(decoded reply) (the reply itself without parse); `timeout` bounds the whole exchange,
    the reply's last byte included. Retried with backoff * 2**attempt (or the server's Retry-After, up to
    RETRY_AFTER_MAX s): connection errors and resets, timeouts, torn replies (a truncated body, a status line
    that is not HTTP), HTTP 408/409/429/5xx, malformed replies (not JSON, or a shape `parse` rejects with
    KeyError/IndexError/TypeError/ValueError/AttributeError). Other HTTP errors stop at once. Raises
    RequestFailed; the key never appears in what it returns or raises."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data, where = json.dumps(body).encode(), safe_url(url)
    for attempt in range(retries + 1):
        wait = None
        with _deadline(timeout) as (opener, fired):
            try:
                with opener.open(urllib.request.Request(url, data, headers), timeout=timeout) as r:
                    raw = redact(r.read(), key)
                try:
                    d = json.loads(raw)
                    return parse(d) if parse else d
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    why = f"malformed reply ({redact(str(e), key)[:200]}): {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 409, 429):
                    try:
                        text = redact(e.read(1 << 16), key)[:300]  # redacted first: no piece of the key is left
                    except (OSError, http.client.HTTPException):
                        text = b""
                    raise RequestFailed(f"{where}: HTTP {e.code}: {text!r}") from None
                why, wait = f"HTTP {e.code}", _retry_after(e.headers)
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, torn replies
                why = redact(" ".join(f"{type(e).__name__}: {e}".split()), key)  # one line: BadStatusLine has \r\n
            if fired:
                why = f"timed out: no complete reply within {timeout:g} s"
        if attempt == retries:
            raise RequestFailed(f"{where}: {why} (after {retries + 1} tries)")
        time.sleep(backoff * 2 ** attempt if wait is None else max(wait, backoff * 2 ** attempt))
