"""Forces one thread; every tool here imports it first, before torch, spconv or transformers.

spconv 2.3.8's CPU `scatter_add` lets its OpenMP threads share row pointers, so a multi-threaded
sparse convolution now and then adds a product to the wrong output row (README.md here). OpenMP
reads OMP_NUM_THREADS once, when its runtime loads, so it is set here before anything loads torch
or spconv, and torch's own setting (which also sets OpenMP's for spconv) is pinned to 1 after.
"""
import os

os.environ['OMP_NUM_THREADS'] = '1'
os.environ['MKL_NUM_THREADS'] = '1'

import torch  # noqa: E402

torch.set_num_threads(1)
if torch.get_num_threads() != 1:
    raise SystemExit(f'one_thread: torch still uses {torch.get_num_threads()} threads')
