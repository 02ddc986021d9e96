"""The OpenAI-compatible requests (api.completions, evaluate.py --api-url) against the scripted server of
tests/test_transport.py: malformed text and fields become error records; the API key never reaches a record, an
error or stderr."""
import json

import api
import evaluate
import test_transport
import transport
from conftest import write_jsonl
from test_faults import run_main
from test_transport import completion

serve = test_transport.serve  # the scripted server (a fixture)
KEY = "sk-test-0123456789abcdef"


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
    monkeypatch.setattr(transport.time, "sleep", lambda s: None)
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
