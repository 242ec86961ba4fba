"""Generate a `pipelines` fixture in the format of shared/reference (README "Pipelines") by running
the ORIGINAL TRELLIS pipelines with a new seed and different run shapes: the image run with
num_samples > 1 (decoded to all three formats), multi-image runs with more images, the text run
decoded to meshes and Gaussians, and the text variant on another recorded voxelisation.

usage: OMP_NUM_THREADS=1 python gen_pipelines.py BASE_PIPELINES_DIR OUT_DIR SEED [N_IMAGES] [N_SAMPLES]
The tiny repositories and voxelize_* tensors are taken from BASE (the repositories are copied).
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import sys, os, shutil, copy
from common import *
from safetensors.torch import save_file

base, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
n_images = int(sys.argv[4]) if len(sys.argv) > 4 else 3
n_samples = int(sys.argv[5]) if len(sys.argv) > 5 else 2
bio = load_file(os.path.join(base, 'io.safetensors'))
bmeta = json.load(open(os.path.join(base, 'meta.json')))
img, txt = load_pipelines(base)
captured = {}
for p in (img, txt):
    spy_samplers(p, captured)

# Record every torch.randn the runs draw (the fixture's noise inputs).
_randn = torch.randn
drawn = []


def recording_randn(*a, **k):
    t = _randn(*a, **k)
    drawn.append(t.clone())
    return t


torch.randn = recording_randn
g = torch.Generator().manual_seed(seed)
cond_len, cond_ch = bio['image_cond_multi'].shape[1:]
io = {
    'image_cond_multi': torch.randn(n_images, cond_len, cond_ch, generator=g),
    'text_cond': torch.randn(*bio['text_cond'].shape, generator=g),
    'text_neg_cond': torch.randn(*bio['text_neg_cond'].shape, generator=g),
}
drawn.clear()
vox_meshes = sorted({k[len('voxelize_'):-len('_coords')] for k in bio if k.startswith('voxelize_') and k.endswith('_coords')})
variant_mesh = vox_meshes[seed % len(vox_meshes)]
for m in vox_meshes:
    for suffix in ('coords', 'mesh_vertices', 'mesh_faces'):
        io[f'voxelize_{m}_{suffix}'] = bio[f'voxelize_{m}_{suffix}']

cm = io['image_cond_multi']
runs, calls = {}, {}


def run(name, desc, fn, pipe):
    drawn.clear()
    ret = fn()
    new = collect_run(name, captured, ret, pipe)
    if name.startswith('variant_'):   # the original fixture keeps the variant's step 0 only
        for k in [k for k in new if k.startswith(f'{name}_slat_x_t') and k != f'{name}_slat_x_t0']:
            del new[k]
    io.update(new)
    kinds = ['ss', 'slat'] if len(drawn) == 2 else ['slat']
    for kind, t in zip(kinds, drawn):
        io[f'{name}_{kind}_noise'] = t
    runs[name] = desc
    calls[name] = {'randn_calls': [list(t.shape) for t in drawn]}


img.get_cond = lambda _: {'cond': cm[:1], 'neg_cond': torch.zeros_like(cm[:1])}
run('img', f'TrellisImageTo3DPipeline.run(image, num_samples={n_samples}, seed={seed}) with cond=image_cond_multi[:1], '
    'neg_cond=zeros_like(cond); formats mesh, gaussian, radiance_field',
    lambda: img.run(None, num_samples=n_samples, seed=seed, preprocess_image=False,
                    formats=['mesh', 'gaussian', 'radiance_field']), img)
img.get_cond = lambda _: {'cond': cm, 'neg_cond': torch.zeros_like(cm[:1])}
for mode in ('stochastic', 'multidiffusion'):
    run(f'multi_{mode}', f'run_multi_image({n_images} images, seed={seed + 1}, mode="{mode}", formats=[]) with '
        f'cond=image_cond_multi [{n_images},...], neg_cond zeros [1,...]',
        lambda: img.run_multi_image([None] * n_images, seed=seed + 1, mode=mode, preprocess_image=False,
                                    formats=[]), img)
txt.get_cond = lambda _: {'cond': io['text_cond'], 'neg_cond': io['text_neg_cond']}
run('txt', f'TrellisTextTo3DPipeline.run(prompt, seed={seed + 2}, formats=["mesh", "gaussian"]) with '
    'cond=text_cond, neg_cond=text_neg_cond (random stand-ins for CLIP outputs)',
    lambda: txt.run('prompt', seed=seed + 2, formats=['mesh', 'gaussian']), txt)
vox = io[f'voxelize_{variant_mesh}_coords']
txt.voxelize = lambda mesh: vox
run(f'variant_{variant_mesh}', f'TrellisTextTo3DPipeline.run_variant({variant_mesh} mesh, prompt, seed={seed + 3}, '
    f'formats=[]): voxelize (coords = voxelize_{variant_mesh}_coords with batch column 0 prepended) then sample_slat',
    lambda: txt.run_variant(None, 'prompt', seed=seed + 3, formats=[]), txt)

shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
for repo in ('TRELLIS-image-tiny', 'TRELLIS-text-tiny'):
    shutil.copytree(os.path.join(base, repo), os.path.join(out, repo))
io = {k: v.clone().contiguous() for k, v in io.items()}
save_file(io, os.path.join(out, 'io.safetensors'))
meta = copy.deepcopy(bmeta)
meta['runs'] = runs
meta['randn_calls_per_run'] = calls
meta['generated_by'] = f'tools/reference/gen_pipelines.py seed {seed} (OMP_NUM_THREADS=1), original TRELLIS 6b0d647'
meta['tensors'] = {k: {'shape': list(v.shape), 'dtype': str(v.dtype).replace('torch.', ''), 'desc': ''}
                   for k, v in sorted(io.items())}
json.dump(meta, open(os.path.join(out, 'meta.json'), 'w'), indent=1)
for k, v in sorted(io.items()):
    if not k.startswith(('voxelize_',)) and ('noise' in k or 'coords' in k or 'mesh0_vertices' in k or 'gs0_xyz' in k):
        print(f'  {k:36s} {tuple(v.shape)}')
