"""Reading a resumable state runs no code from it: nothing here changes a number.

torch.distributed.checkpoint (DCP) reads state/.metadata with pickle.load and every non-tensor item of
the sharded state (the optimizer's param_groups values) with torch.load(weights_only=False): a crafted
state/ would run code on --resume. checkpoint.load_state reads the metadata with an Unpickler that builds only
DCP's own metadata classes (below), and each non-tensor item with weights_only=True (plain data only);
DCP reads the tensor items with weights_only=True itself, and the extra state is read the same way.
"""
import io
import pickle
from pathlib import Path

import torch

from errors import UsageError


def _metadata_globals():
    """(module, name) -> object: everything a DCP .metadata pickle may name (torch 2.13 writes the
    dataclasses of torch.distributed.checkpoint.metadata, _StorageInfo, torch.Size, dtypes, layouts by
    name and the checkpoint's path); constructing any of them runs no code of the file's choosing."""
    import pathlib
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    ok = {(md.__name__, n): c for n, c in vars(md).items() if isinstance(c, type) and c.__module__ == md.__name__}
    ok.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    ok.update({(fs.__name__, "_StorageInfo"): fs._StorageInfo, ("torch", "Size"): torch.Size,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath})
    return ok


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _metadata_globals(): os.system, builtins.eval, ... are refused."""

    def __init__(self, file):
        super().__init__(file)
        self.allowed = _metadata_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a checkpoint metadata class") \
                from None


def read_state_metadata(path):
    """DCP's Metadata of the state dir `path`, unpickled by _MetadataUnpickler and checked: every storage
    item lies in a plain file of `path` with no load transforms. Raises UsageError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    f = Path(path) / ".metadata"
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
        if not isinstance(md, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(md).__name__}, not a checkpoint Metadata")
        for info in md.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or \
                    getattr(info, "transform_descriptors", None):
                raise pickle.UnpicklingError(f"a storage item points at {name!r}, not a shard file of the state")
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
        raise UsageError(f"--resume: {f}: {e}; refused (resume only from a state this code wrote)") from None
    md.storage_meta = md.storage_meta or StorageMeta()
    return md


def load_error(e):
    """The line of a failed read that says what was wrong (for torch.load(weights_only=True): which global
    it refused, not its advice to retry with weights_only=False)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Weights only load failed") else lines[0]).rstrip(".")


def dcp_load(sd, path):
    """dcp.load(sd) from the state dir `path` without unpickling anything that could run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    md = read_state_metadata(path)

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):  # no **kwargs: DCP then never falls back to per-rank metadata files
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            # DCP's own load_bytes reads the item with torch.load(weights_only=False): read it here with
            # weights_only=True (plain data or refused), then hand DCP that data re-serialized
            obj, buf = torch.load(value, weights_only=True), io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    try:
        dcp.load(sd, storage_reader=Reader(path), planner=Planner())
    except CheckpointException as e:  # a BaseException: one per failed rank, each with its traceback
        why = load_error(next(iter(e.failures.values()))[0])
        raise UsageError(f"--resume: cannot read the sharded state in {path}: {why}; refused") from None
