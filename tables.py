"""Input tables: nothing here changes a number. The rows a stage reads (local .jsonl/.json/.csv/.parquet or a
hub dataset) and the generation records it grades or scores, every row checked before any model loads; an
error names the file, the 1-based row and the field (docs/design.md §2).

  read_table        rows of a table file or hub dataset (`id`, `id:split`, `id:config:split`)
  load_pairs        (prompt, response) rows for SFT / RL, the fields picked by name or by the known schemas,
                    and for rl.py --rule math each row's gold answer
  read_generations  generation records with the fields a grader needs
"""
import csv
import io
import json
import os

from errors import DataError, first_line
from files import check_unicode, read_jsonl, read_text

# Known schemas, by columns: (prompt column candidates, response/gold column candidates)
PROMPT_FIELDS = ["question", "problem", "prompt", "input", "Question", "instruction"]
RESPONSE_FIELDS = ["response", "completion", "output", "answer"]


def read_csv(path):
    """CSV rows as dicts keyed by the header; a row with more fields than the header is a DataError."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    for i, r in enumerate(rows, 1):
        if None in r:
            raise DataError(f"{path}: row {i}: {len(reader.fieldnames) + len(r[None])} fields, the header has "
                            f"{len(reader.fieldnames)} (an unquoted comma?)")
    return rows


def read_generations(path, need=("completion",)):
    """Generation records (docs/design.md §2) from a JSONL file, refused unless the file exists, holds a
    record, and every row has the fields `need` (names, or a function row -> names) as strings; `thinking`
    and `prompt_ids`, where present, must be true / false and a non-empty list of token ids."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    recs = read_jsonl(path)
    if not recs:
        raise DataError(f"{path}: no records")
    for i, r in enumerate(recs, 1):
        for f in need(r) if callable(need) else need:
            if not isinstance(r.get(f), str):
                raise DataError(f"{path}: row {i}: field '{f}' is missing or not a string")
        if not isinstance(r.get("thinking", True), bool):
            raise DataError(f"{path}: row {i}: field 'thinking' is not true or false")
        ids = r.get("prompt_ids")
        if ids is not None and not (isinstance(ids, list) and ids and
                                    all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids)):
            raise DataError(f"{path}: row {i}: field 'prompt_ids' is not a non-empty list of token ids")
    return recs


def read_table(spec, split="train"):
    """Rows (list of dicts) from a local .jsonl/.json/.csv/.parquet file or a hub dataset id
    (`id`, `id:split`, `id:config:split`)."""
    spec = str(spec)
    ext = os.path.splitext(spec)[1].lower()
    if ext in (".jsonl", ".json", ".csv", ".parquet") or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: {'is a directory, not a file' if os.path.isdir(spec) else 'file not found'}")
        if ext == ".jsonl":
            return read_jsonl(spec)
        if ext == ".json":
            try:
                data = json.loads(read_text(spec))
            except json.JSONDecodeError as e:
                if e.msg == "Extra data":  # really JSON lines
                    return read_jsonl(spec)
                raise DataError(f"{spec}: invalid JSON at line {e.lineno} ({e.msg})") from None
            data = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise DataError(f"{spec}: expected a list of objects")
            for i, r in enumerate(data, 1):
                if not isinstance(r, dict):
                    raise DataError(f"{spec}: row {i}: expected an object, got {type(r).__name__}")
                check_unicode(r, f"{spec}: row {i}")
            return data
        if ext == ".csv":
            return read_csv(spec)
        if ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            try:
                return pq.read_table(spec).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{spec}: not a readable parquet file ({first_line(e)})") from None
        raise DataError(f"{spec}: unknown file type (want .jsonl, .json, .csv or .parquet)")
    import datasets  # a hub id
    parts = spec.split(":")
    name, config, sp = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else split)
    try:
        return list(datasets.load_dataset(name, config, split=sp))
    except Exception as e:  # noqa: BLE001 -- many failure types (network, missing config, ...)
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {e})") from None


def _pick(row, candidates):
    return next((c for c in candidates if c in row), None)


def load_pairs(spec, prompt_field=None, response_field=None, need_response=True, split="train", gold_field=None):
    """(prompt, response) rows of read_table(spec) for SFT / RL prompts, validated before any training starts.
    Returns dicts with prompt, [response], [gold: str of the `gold_field` value], id, row (1-based). Errors
    name file, row and field."""
    rows = read_table(spec, split)
    if not rows:
        raise DataError(f"{spec}: no rows")
    pf = prompt_field or _pick(rows[0], PROMPT_FIELDS)
    rf = response_field or (_pick(rows[0], RESPONSE_FIELDS) if need_response else None)
    if pf is None:
        raise DataError(f"{spec}: row 1: no prompt field (looked for {PROMPT_FIELDS}; use --prompt-field)")
    if need_response and rf is None:
        raise DataError(f"{spec}: row 1: no response field (looked for {RESPONSE_FIELDS}; use --response-field)")
    out = []
    for i, r in enumerate(rows, 1):
        item = {"row": i, "id": str(r.get("id", r.get("unique_id", i)))}
        for key, field in (("prompt", pf), ("response", rf)):
            if field is None:
                continue
            v = r.get(field)
            if v is None:
                raise DataError(f"{spec}: row {i}: missing field '{field}'")
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{spec}: row {i}: field '{field}' is empty or not a string")
            item[key] = v
        if gold_field:
            if r.get(gold_field) is None:
                raise DataError(f"{spec}: row {i}: missing field '{gold_field}' (the gold answer)")
            item["gold"] = str(r[gold_field])
        out.append(item)
    return out
