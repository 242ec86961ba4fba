"""Re-run every run recorded in a `pipelines` fixture through the ORIGINAL TRELLIS pipelines
(TrellisImageTo3DPipeline / TrellisTextTo3DPipeline loaded from the fixture's tiny repositories),
with the recorded noise and conditioning, and write a copy of the fixture whose outputs are the
re-run values. Prints, per tensor, the rel L2 between the re-run and the recorded value.

usage: OMP_NUM_THREADS=1 python rerun_pipelines.py pipelines OUT_ROOT
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import sys, os, shutil
from common import *
from safetensors.torch import save_file
from trellis.modules import sparse as sp

src, dst = sys.argv[1], sys.argv[2]
d = os.path.join(REF, src)
io = load_file(os.path.join(d, 'io.safetensors'))
meta = json.load(open(os.path.join(d, 'meta.json')))

img, txt = load_pipelines(d)

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

captured = {}
for p in (img, txt):
    spy_samplers(p, captured)

new = {}


def record(run, ret, pipe):
    new.update(collect_run(run, captured, ret, pipe))


def with_cond(pipe, cond, neg):
    pipe.get_cond = lambda _: {'cond': cond, 'neg_cond': neg}


runs = meta['runs']
cond_multi = io['image_cond_multi']
for run in runs:
    queue[:] = [io[k] for k in (f'{run}_ss_noise', f'{run}_slat_noise') if k in io]
    if run == 'img':
        with_cond(img, cond_multi[:1], torch.zeros_like(cond_multi[:1]))
        ret = img.run(None, num_samples=1, seed=5007, preprocess_image=False,
                      formats=['mesh', 'gaussian', 'radiance_field'])
        record(run, ret, img)
    elif run.startswith('multi_'):
        mode = run[len('multi_'):]
        img.get_cond = lambda images: {'cond': cond_multi, 'neg_cond': torch.zeros_like(cond_multi[:1])}
        ret = img.run_multi_image([None, None], seed=5008, mode=mode, preprocess_image=False, formats=[])
        record(run, ret, img)
    elif run == 'txt':
        with_cond(txt, io['text_cond'], io['text_neg_cond'])
        ret = txt.run('prompt', seed=5009, formats=['gaussian'])
        record(run, ret, txt)
    elif run.startswith('variant_'):
        shape = run[len('variant_'):]
        with_cond(txt, io['text_cond'], io['text_neg_cond'])
        vox = io[f'voxelize_{shape}_coords']
        txt.voxelize = lambda mesh: vox
        ret = txt.run_variant(None, 'prompt', seed=5010, formats=[])
        record(run, ret, txt)
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
