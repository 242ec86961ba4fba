"""Glue for running the ORIGINAL TRELLIS code on CPU next to trellis-rs (see README.md here).

TRELLIS_ORIG: a checkout of microsoft/TRELLIS (with its FlexiCubes submodule); default ../../../trellis-orig.
REF: the fixture set to read; default $TRELLIS_REFERENCE_DIR, else ../../../shared/reference.
"""
import os, sys, json
HERE = os.path.dirname(os.path.abspath(__file__))
ORIG = os.environ.get('TRELLIS_ORIG', os.path.join(HERE, '..', '..', '..', 'trellis-orig'))
os.environ.setdefault('SPCONV_ALGO', 'native')
os.environ.setdefault('ATTN_BACKEND', 'flash_attn')
os.environ.setdefault('SPARSE_BACKEND', 'spconv')
sys.path.insert(0, os.path.join(HERE, 'shims'))
sys.path.insert(0, ORIG)
import types
_t = types.ModuleType('trellis'); _t.__path__ = [os.path.join(ORIG, 'trellis')]; sys.modules['trellis'] = _t
import torch
from unittest import mock as _mock
for _n in ('utils3d', 'open3d', 'transformers', 'diff_gaussian_rasterization', 'nvdiffrast', 'nvdiffrast.torch', 'xatlas', 'pyvista', 'pymeshfix', 'igraph', 'trimesh'):
    sys.modules.setdefault(_n, _mock.MagicMock())
from safetensors.torch import load_file
torch.set_grad_enabled(False)
from torch.overrides import TorchFunctionMode


class _OnCpu(TorchFunctionMode):
    """Hard-coded device='cuda' / .cuda() in the original run on CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if str(kwargs.get('device', '')).startswith('cuda'):
            kwargs['device'] = 'cpu'
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple('cpu' if (isinstance(a, str) and a.startswith('cuda')) or
                         (isinstance(a, torch.device) and a.type == 'cuda') else a for a in args)
        return func(*args, **kwargs)


_OnCpu().__enter__()
_p = types.ModuleType('trellis.pipelines'); _p.__path__ = [os.path.join(ORIG, 'trellis', 'pipelines')]
sys.modules['trellis.pipelines'] = _p

REF = os.environ.get('REF', os.environ.get('TRELLIS_REFERENCE_DIR', os.path.join(HERE, '..', '..', '..', 'shared', 'reference')))


def load(fx):
    d = os.path.join(REF, fx)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    sd = load_file(os.path.join(d, 'model.safetensors'))
    io = load_file(os.path.join(d, 'io.safetensors'))
    return cfg, sd, io


def build(cfg, sd, fp32=False):
    from trellis import models
    args = dict(cfg['args'])
    if fp32:
        args['use_fp16'] = False
    m = getattr(models, cfg['name'])(**args)
    if fp32:
        sd = {k: v.float() for k, v in sd.items()}
    m.load_state_dict(sd)
    m.eval()
    # spconv's CPU path refuses a fused bias in inference mode (as the fixture README says)
    import spconv.pytorch as spconv
    for mod in m.modules():
        if isinstance(mod, spconv.conv.SparseConvolution):
            mod.train()
    return m


def rel(a, b):
    a = a.double(); b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
