"""Re-run every run recorded in a `pipelines` fixture through the ORIGINAL TRELLIS pipelines
(TrellisImageTo3DPipeline / TrellisTextTo3DPipeline loaded from the fixture's tiny repositories),
with the recorded noise and conditioning, and write a copy of the fixture whose outputs are the
re-run values. Prints, per tensor, the rel L2 between the re-run and the recorded value.

usage: OMP_NUM_THREADS=1 python rerun_pipelines.py pipelines OUT_ROOT
"""
import sys, os, shutil
from common import *
from safetensors.torch import save_file
from trellis.modules import sparse as sp
from trellis.pipelines.trellis_image_to_3d import TrellisImageTo3DPipeline
from trellis.pipelines.trellis_text_to_3d import TrellisTextTo3DPipeline

src, dst = sys.argv[1], sys.argv[2]
d = os.path.join(REF, src)
io = load_file(os.path.join(d, 'io.safetensors'))
meta = json.load(open(os.path.join(d, 'meta.json')))

TrellisImageTo3DPipeline._init_image_cond_model = lambda self, name: None
TrellisTextTo3DPipeline._init_text_cond_model = lambda self, name: None
img = TrellisImageTo3DPipeline.from_pretrained(os.path.join(d, 'TRELLIS-image-tiny'))
txt = TrellisTextTo3DPipeline.from_pretrained(os.path.join(d, 'TRELLIS-text-tiny'))
for p in (img, txt):
    for m in p.models.values():
        for mod in m.modules():
            if type(mod).__name__ in ('SubMConv3d', 'SparseConv3d') and hasattr(mod, 'algo'):
                mod.train()   # spconv's CPU path refuses a fused bias in inference mode

# The recorded noise replaces torch.randn, call by call, in the order the run draws it.
_randn = torch.randn
queue = []


def recorded_randn(*shape, **kw):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else tuple(shape)
    if not queue:
        raise RuntimeError(f'unexpected torch.randn{shape}')
    t = queue.pop(0)
    if tuple(t.shape) != shape:
        raise RuntimeError(f'torch.randn{shape} but the recorded noise is {tuple(t.shape)}')
    return t.clone()


torch.randn = recorded_randn

# Capture what the samplers return (the pipelines keep only .samples).
captured = {}


def spy(pipe, attr, tag):
    sampler = getattr(pipe, attr)
    orig = sampler.sample

    def sample(*a, **k):
        r = orig(*a, **k)
        captured[tag] = r
        return r
    sampler.sample = sample


for p in (img, txt):
    spy(p, 'sparse_structure_sampler', 'ss')
    spy(p, 'slat_sampler', 'slat')

new = {}


def record(run, ret, formats):
    captured_ss = captured.pop('ss', None)
    if captured_ss is not None:
        for i, x in enumerate(captured_ss.pred_x_t):
            new[f'{run}_ss_x_t{i}'] = x
        for i, x in enumerate(captured_ss.pred_x_0):
            new[f'{run}_ss_pred_x0_{i}'] = x
        new[f'{run}_ss_samples'] = captured_ss.samples
    s = captured.pop('slat')
    for i, x in enumerate(s.pred_x_t):
        new[f'{run}_slat_x_t{i}'] = x.feats
    new[f'{run}_slat_samples'] = s.samples.feats
    new[f'{run}_slat_coords'] = s.samples.coords.int()
    if captured_ss is not None:
        new[f'{run}_coords'] = s.samples.coords.int()
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


def with_cond(pipe, cond, neg):
    pipe.get_cond = lambda _: {'cond': cond, 'neg_cond': neg}


def slat_of(run, pipe):
    """The denormalised slat the run decodes from (what the pipeline hands to decode_slat)."""
    std = torch.tensor(pipe.slat_normalization['std'])[None]
    mean = torch.tensor(pipe.slat_normalization['mean'])[None]
    new[f'{run}_slat'] = new[f'{run}_slat_samples'] * std + mean


runs = meta['runs']
cond_multi = io['image_cond_multi']
for run in runs:
    queue[:] = [io[k] for k in (f'{run}_ss_noise', f'{run}_slat_noise') if k in io]
    if run == 'img':
        with_cond(img, cond_multi[:1], torch.zeros_like(cond_multi[:1]))
        ret = img.run(None, num_samples=1, seed=5007, preprocess_image=False,
                      formats=['mesh', 'gaussian', 'radiance_field'])
        record(run, ret, None); slat_of(run, img)
    elif run.startswith('multi_'):
        mode = run[len('multi_'):]
        img.get_cond = lambda images: {'cond': cond_multi, 'neg_cond': torch.zeros_like(cond_multi[:1])}
        ret = img.run_multi_image([None, None], seed=5008, mode=mode, preprocess_image=False, formats=[])
        record(run, ret, None); slat_of(run, img)
    elif run == 'txt':
        with_cond(txt, io['text_cond'], io['text_neg_cond'])
        ret = txt.run('prompt', seed=5009, formats=['gaussian'])
        record(run, ret, None); slat_of(run, txt)
    elif run.startswith('variant_'):
        shape = run[len('variant_'):]
        with_cond(txt, io['text_cond'], io['text_neg_cond'])
        vox = io[f'voxelize_{shape}_coords']
        txt.voxelize = lambda mesh: vox
        ret = txt.run_variant(None, 'prompt', seed=5010, formats=[])
        record(run, ret, None); slat_of(run, txt)
    else:
        raise SystemExit(f'unknown run {run}')
    if queue:
        raise SystemExit(f'{run}: {len(queue)} recorded noise tensors were not drawn')

for k in sorted(new):
    v = new[k]
    if k not in io:
        continue
    if io[k].shape == v.shape and v.is_floating_point():
        print(f'  {k:32s} rerun vs recorded {rel(v, io[k]):.3e}')
    else:
        same = io[k].shape == v.shape and torch.equal(io[k], v.to(io[k].dtype))
        print(f'  {k:32s} {"identical" if same else "DIFFERENT " + str(tuple(v.shape)) + " vs " + str(tuple(io[k].shape))}')
missing = [k for k in io if k not in new and not k.endswith('_noise') and not k.startswith(('voxelize_', 'image_cond', 'text_'))]
print('  not re-run:', missing)

out = os.path.join(dst, src)
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(d, out)
merged = dict(io)
merged.update({k: v.to(io[k].dtype).clone().contiguous() for k, v in new.items() if k in io})
save_file(merged, os.path.join(out, 'io.safetensors'))
