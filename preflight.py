"""Checks before anything loads: nothing here changes a number. Is the model dir (a local path or a hub id)
one this code can load, can this machine run the device and ranks asked for, and why is no GPU usable, can the
outputs be written, is the package a flag needs installed; each problem one line naming the flag and the path,
found before any weight is read and before the first collective.

  check_path    a path that looks local exists (common's loaders)
  check_tokenizer_files, check_tokenizer   a dir holds tokenizer files; a loaded tokenizer gives text
                back unchanged and has a chat template
  read_config, model_context   config.json as a dict; the context length it is made for
  check_model   the model_type and head this transformers knows, tokenizer files, complete safetensors
  import_optional, check_out_file, check_out_dir   an optional package a flag needs; an output path can be written
  check_optimizer   --optim, and what adamw8bit needs (cli.check_training, before any model loads)
  check_device, check_local_rank, check_dist_timeout   --device, this rank's GPU, --dist-timeout
                (common.resolve_device, common.init_dist)
  nvidia_driver, no_gpu_reason   the NVIDIA driver's version; why torch sees no GPU
"""
import glob
import importlib
import json
import math
import os
import re

import torch

from errors import UsageError, first_line
from files import read_text

# Files a tokenizer loads from: the fast tokenizer's tokenizer.json, a sentencepiece model (Llama / Gemma's
# tokenizer.model, DeBERTa-v3's spm.model, XLM-R's sentencepiece.bpe.model), or a slow BPE / WordPiece vocab.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spm.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def check_path(path, what):
    """A path that looks local (starts with ./, /, ~, or has two slashes) must exist; a hub id passes."""
    p = os.path.expanduser(str(path))
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1  # a hub id is "org/name"
    if looks_local and not os.path.exists(p):
        raise UsageError(f"{what} path does not exist: {path}")
    return p


def check_tokenizer_files(p, what, path):
    """A local dir `p` (given as `path` by the flag `what`) holds a file a tokenizer loads from."""
    if os.path.isdir(p) and not any(os.path.isfile(os.path.join(p, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"{what} {path}: no tokenizer files (tokenizer.json, or a sentencepiece model such as "
                         f"tokenizer.model)")


def model_context(cfg):
    """The longest sequence (prompt + completion) a model config is made for, in tokens, or None when it does
    not say: max_position_embeddings (or n_positions / seq_length), stretched by a RoPE scaling factor when
    that factor applies to it (YaRN / linear / dynamic over original_max_position_embeddings), as vLLM reads it."""
    cfg = cfg.get("text_config") or cfg
    n = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
              if isinstance(cfg.get(k), int)), None)
    rope = cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if n and kind in ("yarn", "linear", "dynamic") and rope.get("original_max_position_embeddings", n) == n:
        n = int(n * float(rope.get("factor", 1.0)))
    return n


ROUND_TRIP = "a b c"  # what every tokenizer must give back unchanged: decode(encode(ROUND_TRIP))


def check_tokenizer(tok, what, path, require_chat_template=True):
    """A loaded tokenizer gives ROUND_TRIP back unchanged and, when asked, has a chat template. The known
    cause of a tokenizer that loses spaces is the transformers version: 5.17 loads DeepSeek-R1-Distill-Llama
    (tokenizer_class LlamaTokenizerFast over a ByteLevel tokenizer.json) as a Metaspace tokenizer, and
    "Is it worth me being alive?" comes back "Isitworthmebeingalive?"."""
    import transformers
    back = tok.decode(tok.encode(ROUND_TRIP, add_special_tokens=False), skip_special_tokens=True)
    if back != ROUND_TRIP:
        raise UsageError(f"{what} {path}: its tokenizer ({type(tok).__name__}) loses text: decode(encode("
                         f"{ROUND_TRIP!r})) = {back!r}, which would corrupt every target, rollout, reward input and "
                         f"grade. The known cause is the transformers version (installed: {transformers.__version__}): "
                         f"5.17 loads DeepSeek-R1-Distill-Llama's tokenizer (tokenizer_class LlamaTokenizerFast over a "
                         f"ByteLevel tokenizer.json) as a Metaspace one and drops every space; install the versions "
                         f"requirements.txt pins")
    if require_chat_template and not tok.chat_template:
        raise UsageError(f"{what} {path}: its tokenizer has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json chat_template)")


def read_config(path, what="--model"):
    """config.json of a local dir or a hub id, as a plain dict (no config class is built, so an unknown
    model_type can be named)."""
    from transformers import PretrainedConfig
    p = check_path(path, what)
    try:
        return PretrainedConfig.get_config_dict(p)[0]
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: cannot read its config.json ({first_line(e)})") from None


HEADS = {"causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal language model (AutoModelForCausalLM)"),
         "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                     "a sequence classifier (AutoModelForSequenceClassification)")}


def check_model(path, what="--model", head="causal-lm", trust_remote_code=False):
    """A model dir checked before any weight is read and before the first collective, each problem one
    line naming the dir: config.json names a model_type this transformers knows and, for it, a `head`
    ("causal-lm", or "seq-cls" for a reward model); a local dir has tokenizer files and
    safetensors files whose headers are complete and as long as they say (a cut download). A hub id
    gets the config check (its files are fetched at load). Returns the config dict."""
    from transformers.models.auto import configuration_auto, modeling_auto
    cfg = read_config(path, what)
    mt = cfg.get("model_type")
    if not (trust_remote_code and "auto_map" in cfg):  # a model with its own code names its own classes
        if mt not in configuration_auto.CONFIG_MAPPING_NAMES:
            import transformers
            raise UsageError(f"{what} {path}: config.json has model_type {mt!r}, unknown to transformers "
                             f"{transformers.__version__} (a newer transformers, or --trust-remote-code for a model "
                             f"that ships its own code)")
        names, kind = HEADS[head]
        if mt not in getattr(modeling_auto, names):
            raise UsageError(f"{what} {path}: model_type {mt!r} (architectures {cfg.get('architectures')}) "
                             f"is not {kind}")
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        check_tokenizer_files(p, what, path)
        for f in _safetensors_files(p, what, path):
            _check_safetensors(os.path.join(p, f), what, path)
    return cfg


def _safetensors_files(p, what, path):
    """The weight files of a local dir: those its model.safetensors.index.json names, else *.safetensors."""
    index = os.path.join(p, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            files = sorted(set(json.loads(read_text(index))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{what} {path}: model.safetensors.index.json has no weight_map") from None
    else:
        files = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
    if not files:
        raise UsageError(f"{what} {path}: no safetensors weights (model.safetensors or model.safetensors.index.json)")
    return files


def _check_safetensors(f, what, path):
    """A safetensors file is 8 bytes of header length n, n bytes of JSON header, then the tensor data, whose
    extent the header's data_offsets give: a shorter file is a cut download or a failed write."""
    name = os.path.basename(f)
    if not os.path.isfile(f):
        raise UsageError(f"{what} {path}: weight file {name} is missing (named by model.safetensors.index.json)")
    size = os.path.getsize(f)
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        try:
            header = json.loads(fh.read(n)) if 0 <= n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{what} {path}: {name} has no complete safetensors header ({size} bytes): a truncated "
                         f"or corrupt file; download or export it again")
    need = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < need:
        raise UsageError(f"{what} {path}: {name} is truncated ({size} of {need} bytes); download or export it again")


def import_optional(module, flag, pip_name=None):
    """Import an optional package a flag needs at start (before any model loads), with a one-line hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs the {module} package: pip install {pip_name or module}") from None


def check_out_file(path, flag="--out"):
    """An output FILE can be written: its directory exists and is writable, and it is not a directory."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; give a file path")
    if not os.path.isdir(d):
        raise UsageError(f"{flag}: directory {d} does not exist")
    _check_writable(d, flag)


def check_out_dir(path, flag="--out"):
    """An output DIR can be written, checked before any work: an existing dir is writable, or the nearest
    existing parent of a new one is (it is created later, by the run)."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"{flag} {path} is a file, not a directory")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{flag} {path}: {p} is a file, not a directory")
    _check_writable(p, flag)


def _check_writable(d, flag):
    """access(2) says EROFS for a read-only filesystem even to root, EACCES for missing permissions."""
    if not os.access(d, os.W_OK | os.X_OK):
        ro = os.statvfs(d).f_flag & os.ST_RDONLY
        raise UsageError(f"{flag}: {d} is {'on a read-only filesystem' if ro else 'not writable'}; "
                         f"pick a writable {flag}")


def check_optimizer(name, device):
    """--optim adamw, or adamw8bit (bitsandbytes' 8-bit AdamW) on a CUDA device with bitsandbytes importable."""
    if name not in ("adamw", "adamw8bit"):
        raise UsageError(f"--optim must be adamw or adamw8bit, got {name!r}")
    if name == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise UsageError("--optim adamw8bit needs a CUDA device (bitsandbytes' 8-bit AdamW); use --optim adamw")
        try:
            importlib.import_module("bitsandbytes")
        except ImportError as e:
            raise UsageError(f"--optim adamw8bit needs bitsandbytes: {e}") from None


# --- the device and the ranks; the GPU: why torch sees none -------------------------------------------

def check_device(device):
    """--device auto | cuda | cpu; UsageError with the likely cause for 'cuda' without a usable GPU or 'auto' on a
    machine with an NVIDIA driver but no GPU torch can use (docs/design.md §2, 'Compute')."""
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cpu" or torch.cuda.is_available():
        return
    if device == "cuda" or nvidia_driver() is not None:
        asked = "--device cuda" if device == "cuda" else "this machine has an NVIDIA GPU"
        raise UsageError(f"{asked}, but torch sees no usable GPU: {no_gpu_reason()}. "
                         f"Pass --device cpu to run on the CPU on purpose.")


def check_local_rank(local_rank):
    """Under torchrun on CUDA: the GPU of this rank's LOCAL_RANK is one torch sees."""
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {local_rank} but torch sees {torch.cuda.device_count()} GPU(s): "
                         f"--nproc_per_node is larger than the GPUs visible (CUDA_VISIBLE_DEVICES?)")


def check_dist_timeout(timeout_min):
    """The collective timeout in minutes: a positive, finite number."""
    if not (isinstance(timeout_min, (int, float)) and 0 < timeout_min < math.inf):
        raise UsageError(f"--dist-timeout must be a positive number of minutes, got {timeout_min}")


def nvidia_driver():
    """The NVIDIA kernel driver's version when this machine has one loaded ('580.65.06'), '' when a GPU device
    node exists but the version is unreadable, else None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
        return m.group(1) if m else ""
    except OSError:
        return "" if glob.glob("/dev/nvidia[0-9]*") else None


def no_gpu_reason():
    """Why torch sees no CUDA device, in one sentence naming the likely cause."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build "
                f"(README, 'GPU install')")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    drv = nvidia_driver()
    if drv is None:
        return "no NVIDIA driver is loaded on this machine (/proc/driver/nvidia/version is missing)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and the NVIDIA driver "
            f"{drv or '(version unknown)'} cannot run it: CUDA 13 builds need driver >= 580, CUDA 12.x builds "
            f">= 525; update the driver or install torch from PyTorch's CUDA 12.x index (README, 'GPU install')")
