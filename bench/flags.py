"""The setup every benchmark shares; nothing in it changes a measured number: the repository on the import
path (a benchmark runs as `python bench/NAME.py` and imports the stages, kernels/ and runs/tinymodels.py),
one parser with the common flags, and the device with its compute dtype.

    p = flags.parser(__doc__, shape="qwen2.5-1.5b", seed=True)  # --shape (a key of shapes.SHAPES), --seed
    device, dtype = flags.device_dtype()                         # cuda + bf16 when torch sees a GPU, else cpu + fp32
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parser(doc, shape=None, seed=False):
    """An ArgumentParser described by the first line of `doc`; with `shape`, --shape (that default, one of
    bench/shapes.py's SHAPES); with `seed`, --seed (default 0) for the random weights, prompts and lengths."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    if shape:
        from shapes import SHAPES
        p.add_argument("--shape", default=shape, choices=list(SHAPES), help="model shape (bench/shapes.py)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return p


def device_dtype():
    """(device, compute dtype): CUDA with bf16 when torch sees a GPU, else the CPU with fp32 (a smoke run:
    its timings say nothing about a GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32
