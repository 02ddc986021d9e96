"""The OpenAI-compatible requests: nothing here changes a number. completions() for evaluate.py --api-url (vLLM,
SGLang) and chat() for a judge (--judge-url), each one transport.http_post (retries, backoff, Retry-After, a deadline
on the whole exchange, the API key redacted) whose reply is checked here: a reply of another shape is malformed and
retried. RequestFailed (transport's; it exits 2) and safe_url are the names judges.py and evaluate.py take from here.
"""
from concurrent.futures import ThreadPoolExecutor, as_completed

from transport import RequestFailed, http_post, safe_url

__all__ = ["RequestFailed", "safe_url", "reply_text", "completions", "chat"]


def reply_text(x):
    """A text field of a reply, checked: a str that encodes as UTF-8 (json.loads lets a lone surrogate through,
    which the JSONL writers cannot encode). TypeError / ValueError: http_post treats the reply as malformed."""
    if not isinstance(x, str):
        raise TypeError(f"a text field is a {type(x).__name__}, not a string")
    x.encode("utf-8")  # UnicodeEncodeError, a ValueError, on a lone surrogate
    return x


def completions(url, prompts, *, model, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0, seed=0, row_ids=None,
                key=None, workers=16, retries=5, timeout=3600, backoff=1.0, on_done=None, progress=None):
    """POST url/completions once per prompt, `workers` at a time: the prompt as token ids (no server-side
    template), seed * 1_000_003 + row_ids[i] as prompt i's seed, stop_ids as stop_token_ids, special tokens
    kept. As each request ends, on_done(i, out) runs in this thread with out = {"text", "truncated",
    "num_tokens"} (None without usage) or {"error"} (http_post failed for good); on_done returning True
    cancels the requests not started yet. Returns the outs in prompt order (None: cancelled)."""
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)

    def parse(d):  # a reply of another shape (text not UTF-8, a token count that is not one) is malformed
        ch = d["choices"][0]
        n = (d.get("usage") or {}).get("completion_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"usage.completion_tokens is {n!r}, not a token count")
        return reply_text(ch["text"]), ch.get("finish_reason"), n

    def one(i):
        body = {"model": model, "prompt": prompts[i], "n": 1, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed * 1_000_003 + row_ids[i], "stop_token_ids": list(stop_ids),
                "skip_special_tokens": False}
        try:
            text, finish, n = http_post(url.rstrip("/") + "/completions", body, key, retries=retries,
                                        backoff=backoff, timeout=timeout, parse=parse)
        except RequestFailed as e:
            return i, {"error": str(e)}
        return i, {"text": text, "truncated": finish == "length", "num_tokens": n}

    outs = [None] * len(prompts)
    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(one, i) for i in range(len(prompts))]
        for fut in as_completed(futures):
            if fut.cancelled():
                continue
            i, outs[i] = fut.result()
            if progress is not None:
                progress.update(1)
            if on_done is not None and on_done(i, outs[i]):
                for f in futures:
                    f.cancel()  # the requests not started yet
    return outs


def chat(url, prompt, *, model, key=None, max_tokens=512, retries=5, timeout=3600):
    """One user turn to url/chat/completions at temperature 0 -> the reply's text (or RequestFailed)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}
    return http_post(url.rstrip("/") + "/chat/completions", body, key, retries=retries, timeout=timeout,
                     parse=lambda d: reply_text(d["choices"][0]["message"]["content"] or ""))
