"""Glue for running the ORIGINAL TRELLIS code on CPU next to trellis-rs (see README.md here).

TRELLIS_ORIG: a checkout of microsoft/TRELLIS (with its FlexiCubes submodule); default ../../../trellis-orig.
REF: the fixture set to read; default $TRELLIS_REFERENCE_DIR, else ../../../shared/reference.
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
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


def load_pipelines(d):
    """The original TrellisImageTo3DPipeline and TrellisTextTo3DPipeline of a `pipelines` fixture
    (its TRELLIS-image-tiny / TRELLIS-text-tiny folders), without their image/text encoders."""
    from trellis.pipelines.trellis_image_to_3d import TrellisImageTo3DPipeline
    from trellis.pipelines.trellis_text_to_3d import TrellisTextTo3DPipeline
    TrellisImageTo3DPipeline._init_image_cond_model = lambda self, name: None
    TrellisTextTo3DPipeline._init_text_cond_model = lambda self, name: None
    img = TrellisImageTo3DPipeline.from_pretrained(os.path.join(d, 'TRELLIS-image-tiny'))
    txt = TrellisTextTo3DPipeline.from_pretrained(os.path.join(d, 'TRELLIS-text-tiny'))
    import spconv.pytorch as spconv
    for p in (img, txt):
        for m in p.models.values():
            for mod in m.modules():
                if isinstance(mod, spconv.conv.SparseConvolution):
                    mod.train()   # spconv's CPU path refuses a fused bias in inference mode
    return img, txt


def spy_samplers(pipe, captured):
    """Keep what the pipeline's samplers return (`captured['ss']`, `captured['slat']`); the
    pipelines themselves keep only `.samples`."""
    for attr, tag in (('sparse_structure_sampler', 'ss'), ('slat_sampler', 'slat')):
        sampler = getattr(pipe, attr)
        orig = sampler.sample

        def sample(*a, _orig=orig, _tag=tag, **k):
            r = _orig(*a, **k)
            captured[_tag] = r
            return r
        sampler.sample = sample


def collect_run(run, captured, ret, pipe):
    """The fixture tensors of one pipeline run (names: shared/reference pipelines meta.json
    `tensor_naming`) from what `spy_samplers` captured and what the run returned."""
    new = {}
    ss = captured.pop('ss', None)
    if ss is not None:
        for i, x in enumerate(ss.pred_x_t):
            new[f'{run}_ss_x_t{i}'] = x
        for i, x in enumerate(ss.pred_x_0):
            new[f'{run}_ss_pred_x0_{i}'] = x
        new[f'{run}_ss_samples'] = ss.samples
    s = captured.pop('slat')
    for i, x in enumerate(s.pred_x_t):
        new[f'{run}_slat_x_t{i}'] = x.feats
    new[f'{run}_slat_samples'] = s.samples.feats
    new[f'{run}_slat_coords'] = s.samples.coords.int()
    if ss is not None:
        new[f'{run}_coords'] = s.samples.coords.int()
    std = torch.tensor(pipe.slat_normalization['std'])[None]
    mean = torch.tensor(pipe.slat_normalization['mean'])[None]
    new[f'{run}_slat'] = s.samples.feats * std + mean
    for b, g in enumerate(ret.get('gaussian', [])):
        new[f'{run}_gs{b}_xyz'] = g._xyz
        new[f'{run}_gs{b}_features_dc'] = g._features_dc
        new[f'{run}_gs{b}_scaling'] = g._scaling
        new[f'{run}_gs{b}_rotation'] = g._rotation
        new[f'{run}_gs{b}_opacity'] = g._opacity
    for b, r in enumerate(ret.get('radiance_field', [])):
        new[f'{run}_rf{b}_position'] = r.position
        new[f'{run}_rf{b}_trivec'] = r.trivec
        new[f'{run}_rf{b}_density'] = r.density
        new[f'{run}_rf{b}_features_dc'] = r.features_dc
    for b, m in enumerate(ret.get('mesh', [])):
        new[f'{run}_mesh{b}_vertices'] = m.vertices
        new[f'{run}_mesh{b}_faces'] = m.faces.int()
        new[f'{run}_mesh{b}_vertex_attrs'] = m.vertex_attrs
    return new


def run_mesh_decoder(m, x):
    """Forward of an original SLatMeshDecoder `m` on SparseTensor `x`, recording what the
    `model:SLatMeshDecoder` fixtures hold: `upsample<i>_feats/_coords`, `raw_out` (before the
    in-place SDF bias) and `raw_out_coords`, and per batch element `mesh<b>_*` with the FlexiCubes
    grid tensors (`sparse_cube2verts`'s output). Returns (tensors, meshes)."""
    from trellis.representations.mesh import cube2mesh
    rec, grids = {}, []
    orig = cube2mesh.sparse_cube2verts

    def spy(c, f, training=True):
        r = orig(c, f, training=training)
        grids.append((r[0].clone(), r[1].clone()))
        return r

    def keep(name):
        def hook(mod, inp, out):
            rec[f'{name}_feats' if name != 'raw_out' else name] = out.feats.float().clone()
            rec[f'{name}_coords'] = out.coords.int().clone()
        return hook

    handles = [b.register_forward_hook(keep(f'upsample{i}')) for i, b in enumerate(m.upsample)]
    handles.append(m.out_layer.register_forward_hook(keep('raw_out')))
    cube2mesh.sparse_cube2verts = spy
    try:
        meshes = m(x)
    finally:
        cube2mesh.sparse_cube2verts = orig
        for h in handles:
            h.remove()
    assert len(grids) == len(meshes)
    res = m.mesh_extractor.res
    for b, mesh in enumerate(meshes):
        rec[f'mesh{b}_vertices'] = mesh.vertices.float()
        rec[f'mesh{b}_faces'] = mesh.faces.int()
        rec[f'mesh{b}_vertex_attrs'] = mesh.vertex_attrs.float()
        rec[f'mesh{b}_face_normal'] = mesh.face_normal[:, 0].float()
        v_pos, v_attrs = grids[b]
        rec[f'mesh{b}_grid_vertex_coords'] = v_pos.int()
        rec[f'mesh{b}_grid_vertex_attrs'] = v_attrs.float()
        rec[f'mesh{b}_grid_vertex_deformed'] = cube2mesh.get_defomed_verts(v_pos, v_attrs[:, 1:4], res).float()
    return rec, meshes
