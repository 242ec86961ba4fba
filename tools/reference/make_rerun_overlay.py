"""Collect, from a re-run copy of a fixture set (rerun_models.py / rerun_pipelines.py), the tensors
whose re-run value differs materially from the recorded one, into an overlay that
`trellisd parity DIR --rerun OVERLAY` applies on top of DIR.

usage: python make_rerun_overlay.py BASE_SET RERUN_SET OUT_OVERLAY [fixture ...]
Each OUT_OVERLAY/<fixture>/rerun.safetensors holds those tensors; its metadata records the sha256
of the base fixture's io.safetensors (the overlay refuses to apply to any other file) and how the
values were produced.
"""
import sys, os, hashlib, json
import torch
from safetensors.torch import load_file, save_file

base, rerun, out = sys.argv[1:4]
fixtures = sys.argv[4:]
THRESHOLD = 1e-5   # rel L2; below it the recorded value already stands for the original


def sha256(p):
    h = hashlib.sha256()
    with open(p, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


for fx in fixtures:
    bio = os.path.join(base, fx, 'io.safetensors')
    a, b = load_file(bio), load_file(os.path.join(rerun, fx, 'io.safetensors'))
    keep = {}
    for k, v in b.items():
        r = a[k]
        if r.shape != v.shape or not v.is_floating_point():
            if r.shape != v.shape or not torch.equal(r, v):
                keep[k] = v
        elif float((v.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)) > THRESHOLD:
            keep[k] = v
    os.makedirs(os.path.join(out, fx), exist_ok=True)
    meta = {
        'base_io_sha256': sha256(bio),
        'produced_by': 'the original TRELLIS code (microsoft/TRELLIS 6b0d647, torch 2.15.0, spconv 2.3.8 native) '
                       'run with OMP_NUM_THREADS=1 on the fixture\'s own weights and inputs '
                       '(tools/reference/rerun_models.py, rerun_pipelines.py)',
        'threshold_rel_l2': str(THRESHOLD),
    }
    save_file({k: v.clone().contiguous() for k, v in keep.items()},
              os.path.join(out, fx, 'rerun.safetensors'), metadata=meta)
    print(fx, len(keep), 'tensors:', ', '.join(sorted(keep)))
