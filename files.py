"""Files: nothing here changes a number. How a file is written so that a kill, a full disk or a read-only
place never leaves half of it, and how a JSONL file is read back, with one rule for a torn line.

  write_files({path: data})  every file of a set to PATH.tmp (created exclusively, a planted link never
                             followed), then each renamed over its path: a reader sees the old file or the new
  write_json, write_jsonl    one file the same way
  append_jsonl               one line, one os.write with O_APPEND: a kill loses at most the line being written
  write_error                the one-line error of a failed write: DiskFull (exit 1, bytes needed and free) or
                             UsageError (exit 2, a read-only or unwritable place)
  read_text, read_jsonl      UTF-8 (a byte-order mark dropped), errors naming the file, the line or row, the field

The torn-line rule, the same for every JSONL reader of the repository: a bad line is a DataError naming the
file and the row, except the LAST line of a file this code appends to (metrics.jsonl, evaluate.py's
NAME.jsonl: read with appended=True), which a kill or a full disk can cut short: it is dropped with a warning.
"""
import errno
import json
import os
import re
import resource
import shutil

from errors import DataError, DiskFull, UsageError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _size(n):
    """n bytes as a person reads them: 12 bytes, 3.4 MiB."""
    return next(f"{n / k:.1f} {u}" for k, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")) if n >= k) \
        if n >= 1024 else f"{n} bytes"


def write_error(path, e, need=None, cleaned=True, what=None):
    """The one-line error for an exception `e` raised while writing `path`, or None when `e` is not a write
    failure: DiskFull (exit 1) for a full disk, a quota or the file-size limit, with the bytes needed (when
    known) and free; UsageError (exit 2) for a read-only or unwritable place. `what` names the write in the
    message (default: the path). Libraries that wrap the OS error (safetensors, torch.distributed.checkpoint)
    are read by the errno their message carries."""
    path = path or getattr(e, "filename", None) or "a file"
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"(?:\[Errno |os error )(\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code is None and re.search(r"unexpected pos \d+ vs|file write failed", str(e)):
        # torch.save's zip writer drops the errno: a full disk is one with nothing left, else the size limit
        code = errno.ENOSPC if shutil.disk_usage(d).free < max(need or 0, 1 << 20) else \
            errno.EFBIG if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY else None
    if code not in DISK_FULL + _NOT_WRITABLE:
        return None
    msg = f"cannot write {what or path}: {os.strerror(code)}"
    if code in _NOT_WRITABLE:
        return UsageError(f"{msg}; write somewhere writable")
    if code == errno.EFBIG:
        return DiskFull(f"{msg} (over the file-size limit, `ulimit -f`{f'; it needs {_size(need)}' if need else ''})")
    need = f"needs about {_size(need)}, " if need else ""
    return DiskFull(f"{msg} ({need}{_size(shutil.disk_usage(d).free)} free there)"
                    + ("; nothing half-written is left" if cleaned else ""))


def remove(path):
    """Delete what is at `path` without following a symlink: a link or a file is unlinked, a real directory
    removed with its contents (shutil.rmtree unlinks the links inside, never their targets)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def fresh_dir(path):
    """An empty directory at `path`, made by one mkdir after whatever was at that name is removed (never
    followed): what is written into it cannot land outside its parent."""
    remove(path)
    os.mkdir(path)


def write_files(files):
    """Write {path: data} atomically, as a set: each data to PATH.tmp, created with O_EXCL | O_NOFOLLOW after
    whatever was at that name is removed (a planted symlink is never followed), then every temp renamed over
    its path (a reader sees the old file or the new one). data: str, bytes, or a function writing into a
    binary file. A failed write removes every temp, leaves every previous file as it was, and raises
    write_error's one line naming the path."""
    tmps, path, data = [], None, None
    try:
        for path, data in files.items():
            tmp = f"{path}.tmp"
            remove(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                data(f) if callable(data) else f.write(data.encode() if isinstance(data, str) else data)
        for path, tmp in zip(files, tmps):
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in tmps:
            remove(tmp)
        err = write_error(path, e, None if callable(data) else len(data.encode() if isinstance(data, str) else data))
        if err is None:
            raise
        raise err from None


def write_json(path, obj):
    """Write JSON atomically (write_files)."""
    write_files({path: json.dumps(obj, indent=2, default=str)})


def _json_line(obj):
    """One JSONL line as UTF-8 bytes, text as is; a lone surrogate (it has no UTF-8) is written escaped
    (\\ud800), which reads back the same."""
    try:
        return (json.dumps(obj, ensure_ascii=False, default=float) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(obj, default=float) + "\n").encode()


def open_no_follow(path, flags, refused):
    """os.open(path, flags) that never follows a link at `path` (O_NOFOLLOW): a link there is a UsageError with
    the message `refused`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(refused) from None
        raise


def append_jsonl(path, obj):
    """One os.write of one line with O_APPEND: processes append to the same file without interleaving
    (a local filesystem), and the line is in the kernel when this returns (a kill loses nothing before it).
    A link at `path` is never followed (O_NOFOLLOW): it is refused, naming the path."""
    line = _json_line(obj)
    try:
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, f"{path} is a symbolic link; remove it "
                            "(an appended file is never written through a link)")
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        raise (write_error(path, e, len(line)) or e) from None


def write_jsonl(path, recs):
    """Write records as JSONL atomically (write_files): a reader sees the old file or the new one."""
    write_files({path: lambda f: f.writelines(_json_line(r) for r in recs)})

# --- reads ----------------------------------------------------------------------------------------------

def read_text(path):
    """A text file as str: UTF-8, a leading byte-order mark dropped (a CSV saved by Excel keeps its first
    column's name). A byte that is not UTF-8 is a DataError naming the file, the line and the byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}: line {line}: byte 0x{data[e.start]:02x} at column {col} is not UTF-8 "
                        f"(save the file as UTF-8)") from None


def check_unicode(value, where):
    """`value` (a parsed JSON value) back, refused if a string in it is no valid Unicode: JSON's lone surrogate
    escapes ("\\ud800") parse, then fail in the tokenizer; the DataError names `where` and the top field."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_unicode(v, where if "field '" in where else f"{where}: field '{k}'")
    elif isinstance(value, list):
        for v in value:
            check_unicode(v, where)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return value


def read_jsonl(path, appended=False):
    """The JSON objects of a JSONL file, one per line (only \\n ends a line, not a U+2028 inside a string;
    blank lines are skipped). A line that is not a JSON object is a DataError naming the file and the row,
    except, with appended=True (a file this code appends to), the LAST line, which a kill or a full disk
    can cut short: it is dropped with a warning. An input file's rows (appended=False) are checked by
    check_unicode."""
    lines = read_text(path).split("\n")
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            bad = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
        except json.JSONDecodeError as e:
            bad = f"invalid JSON ({e.msg} at column {e.colno})"
        if bad is None:
            rows.append(row if appended else check_unicode(row, f"{path}: row {i}"))
        elif appended and i == last:
            print(f"warning: {path}: dropped a torn last line (row {i}): {line[:80]!r}", flush=True)
        else:
            raise DataError(f"{path}: row {i}: {bad}")
    return rows
