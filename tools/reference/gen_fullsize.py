"""Fixtures at the OFFICIAL checkpoint sizes, recorded from the ORIGINAL TRELLIS code.

    OMP_NUM_THREADS=1 TRELLIS_ORIG=/path/to/TRELLIS [UTILS3D=/path/to/utils3d] \\
        python gen_fullsize.py OUT_ROOT --seed 5 [--only SUBSTR ...] [--manifests DIR]

For each official checkpoint listed in CHECKPOINTS, builds the original model class from the config
of its manifest (shared/reference/manifests/<ckpt>.json, key `config`) with random weights
(initialised by the reference README's rules, through the functions of gen_dense.py /
gen_slat_models.py), saves `model.safetensors` as the original's use_fp16 conversion leaves it (the
dtype of every entry checked against the manifest's `state_dict` list: same names, shapes and
dtypes, else the script stops), and records a fixture in the format of the visible fixture of the
same kind under OUT_ROOT/models/fs_<ckpt>:

  * dense models (SparseStructureEncoder / Decoder / FlowModel): one fixture with
    `<out>_mixed_fp16` (the original's use_fp16 forward on CPU) and `<out>_fp32_same_weights` (the
    same fp16-rounded weights run in float32), the naming of gen_dense.py's fp16 fixtures;
  * SLatFlowModel: `out_mixed_fp16` / `out_fp32_same_weights` (gen_slat_models.gen_flow);
  * SLat encoder and decoders, whose handlers take one run per fixture: `fs_<ckpt>` is the use_fp16
    forward (config use_fp16 true, plain output names, as gen_slat_models' fp16 fixtures) and
    `fs_<ckpt>_fp32_same_weights` runs the SAME state_dict (a hard link to the fp16 file) in float32
    (config use_fp16 false) on new random latents over the same voxels.

Inputs are small but real: structure latents [1,8,16,16,16], a 64^3 occupancy for the SS encoder,
SLat inputs on the voxels of a closed ellipsoidal shell (one voxel thick) at 64^3 with a few hundred
to ~2000 voxels, cond [1,1374,1024] for the image flows and [1,77,768] for the text flows.
`fs_slat_flow_txt_dit_B_64l8p2_fp16_b2` adds a batch of 2. Deterministic from --seed (each
checkpoint seeds its own generator from the seed and its position in CHECKPOINTS, so --only
selections give the same files). The weights are GBs: do not commit the output.

ALWAYS run with OMP_NUM_THREADS=1 (spconv 2.3.8's CPU scatter_add races between threads).
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_dense  # noqa: E402  (sets up the original TRELLIS on CPU through common.py)
import gen_slat_models as gsm  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

MANIFESTS = os.path.join(HERE, '..', '..', '..', 'shared', 'reference', 'manifests')


def shell_coords(g, counts, res):
    """One closed ellipsoidal shell (voxels within half a voxel of the surface) per batch element,
    random centre and axis ratios, its size searched so that it holds about `counts[b]` voxels;
    rows sorted lexicographically (b, x, y, z) like the pipeline's argwhere."""
    ax = torch.arange(res, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing='ij'), -1).reshape(-1, 3)
    rows = []
    for b, n in enumerate(counts):
        centre = res / 2 + (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * res / 8
        ratio = 0.75 + 0.5 * torch.rand(3, generator=g, dtype=torch.float64)

        def shell(r):
            axes = r * ratio
            d = (((grid - centre) / axes) ** 2).sum(1).sqrt()
            # distance to the surface along the ray, in voxels (approx.)
            return ((d - 1).abs() * (grid - centre).norm(dim=1) / d.clamp_min(1e-9)) <= 0.5

        lo, hi = 1.0, res * 0.45
        for _ in range(40):
            mid = (lo + hi) / 2
            if int(shell(mid).sum()) < n:
                lo = mid
            else:
                hi = mid
        idx = shell(hi).nonzero()[:, 0]
        rows.append(torch.cat([torch.full((idx.shape[0], 1), b, dtype=torch.long), grid[idx].long()], 1))
    return torch.cat(rows).int()


def manifest(ckpt, mdir):
    return json.load(open(os.path.join(mdir, ckpt + '.json')))


def check_against_manifest(path, man):
    """model.safetensors must hold exactly the manifest's entries (names, shapes, dtypes)."""
    want = {e['key']: (list(e['shape']), e['dtype']) for e in man['state_dict']}
    got = {}
    with safe_open(path, 'pt') as f:
        for k in f.keys():
            sl = f.get_slice(k)
            got[k] = (list(sl.get_shape()), {'F16': 'float16', 'F32': 'float32', 'I64': 'int64',
                                              'I32': 'int32'}.get(sl.get_dtype(), sl.get_dtype()))
    bad = [f'{k}: want {want.get(k)} got {got.get(k)}' for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    if bad:
        raise SystemExit(f'{path}: {len(bad)} entries differ from the manifest:\n  ' + '\n  '.join(bad[:20]))
    print(f'    {os.path.basename(os.path.dirname(path))}: {len(got)} entries match the manifest (names/shapes/dtypes)')


def add_meta(d, extra):
    p = os.path.join(d, 'meta.json')
    meta = json.load(open(p))
    meta.update(extra)
    json.dump(meta, open(p, 'w'), indent=1)


# ----------------------------------------------------------------------------------------- kinds

def dense(kind_fn, root, ckpt, seed, man, **kw):
    args = man['config']['args']
    kind_fn(root, gen_dense.Gen(seed), f'fs_{ckpt}', args, **kw)
    d = os.path.join(root, 'models', f'fs_{ckpt}')
    check_against_manifest(os.path.join(d, 'model.safetensors'), man)
    add_meta(d, {'official_checkpoint': ckpt, 'seed': seed})


def slat_flow(root, ckpt, seed, man, counts, cond_len, sub=None):
    g = torch.Generator().manual_seed(seed)
    args = dict(man['config']['args'], use_fp16=False)
    sub = sub or f'fs_{ckpt}'
    coords = shell_coords(g, counts, args['resolution'])
    gsm.gen_flow(os.path.join(root, 'models'), sub, g, args, coords, cond_len, fp16=True)
    d = os.path.join(root, 'models', sub)
    check_against_manifest(os.path.join(d, 'model.safetensors'), man)
    add_meta(d, {'official_checkpoint': ckpt, 'seed': seed, 'voxels_per_batch': counts_of(coords)})


def counts_of(coords):
    return torch.bincount(coords[:, 0].long()).tolist()


def _float_make(sd16):
    """A stand-in for gen_slat_models.make that builds the float32 model holding `sd16`."""
    def make(name, args, g, norm_std=0.3):
        from trellis import models
        import spconv.pytorch as spconv
        m = getattr(models, name)(**dict(args, use_fp16=False))
        m.load_state_dict({k: v.float() for k, v in sd16.items()})
        m.eval()
        for mod in m.modules():
            if isinstance(mod, spconv.conv.SparseConvolution):
                mod.train()
        return m
    return make


def slat_vae(fn, root, ckpt, seed, man, count):
    """The use_fp16 fixture and its float32 twin on the same weights (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    args = dict(man['config']['args'])
    coords = shell_coords(g, [count], args['resolution'])
    M = os.path.join(root, 'models')
    sub = f'fs_{ckpt}'
    fn(M, sub, g, args, coords)
    d = os.path.join(M, sub)
    msd = os.path.join(d, 'model.safetensors')
    check_against_manifest(msd, man)
    add_meta(d, {'official_checkpoint': ckpt, 'seed': seed, 'voxels_per_batch': counts_of(coords)})
    sd16 = load_file(msd)
    saved = gsm.make
    gsm.make = _float_make(sd16)
    try:
        fn(M, sub + '_fp32_same_weights', g, dict(args, use_fp16=False), coords)
    finally:
        gsm.make = saved
    d32 = os.path.join(M, sub + '_fp32_same_weights')
    os.remove(os.path.join(d32, 'model.safetensors'))
    os.link(msd, os.path.join(d32, 'model.safetensors'))
    add_meta(d32, {'official_checkpoint': ckpt, 'seed': seed, 'voxels_per_batch': counts_of(coords),
                   'same_weights_as': sub,
                   'desc': f'the state_dict of {sub} (float16 where the original converts, a hard link to '
                           'that file) run fully in float32 (config use_fp16 false)'})


# ------------------------------------------------------------------------------------ checkpoints

CHECKPOINTS = [
    ('slat_enc_swin8_B_64l8_fp16', lambda r, c, s, m: slat_vae(
        lambda M, sub, g, a, co: gsm.gen_encoder(M, sub, g, a, co), r, c, s, m, 1200)),
    ('slat_dec_gs_swin8_B_64l8gs32_fp16', lambda r, c, s, m: slat_vae(gsm.gen_gs_decoder, r, c, s, m, 900)),
    ('slat_dec_rf_swin8_B_64l8r16_fp16', lambda r, c, s, m: slat_vae(gsm.gen_rf_decoder, r, c, s, m, 700)),
    ('slat_dec_mesh_swin8_B_64l8m256c_fp16', lambda r, c, s, m: slat_vae(gsm.gen_mesh_decoder, r, c, s, m, 400)),
    ('slat_flow_txt_dit_B_64l8p2_fp16', lambda r, c, s, m: slat_flow(r, c, s, m, [1500], 77)),
    ('slat_flow_img_dit_L_64l8p2_fp16', lambda r, c, s, m: slat_flow(r, c, s, m, [2000], 1374)),
    ('ss_enc_conv3d_16l8_fp16', lambda r, c, s, m: dense(gen_dense.ss_encoder_fp16, r, c, s, m, batch=1, res=64)),
    ('ss_dec_conv3d_16l8_fp16', lambda r, c, s, m: dense(gen_dense.ss_decoder_fp16, r, c, s, m, batch=1, res=16)),
    ('ss_flow_txt_dit_B_16l8_fp16', lambda r, c, s, m: dense(gen_dense.ss_flow, r, c, s, m, batch=1, cond_len=77)),
    ('ss_flow_img_dit_L_16l8_fp16', lambda r, c, s, m: dense(gen_dense.ss_flow, r, c, s, m, batch=1, cond_len=1374)),
    # batch 2 on the text-base SLat flow (the cheapest SLat flow)
    ('slat_flow_txt_dit_B_64l8p2_fp16:b2', lambda r, c, s, m: slat_flow(
        r, c, s, m, [600, 300], 77, sub='fs_slat_flow_txt_dit_B_64l8p2_fp16_b2')),
]


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('out')
    ap.add_argument('--seed', type=int, default=5)
    ap.add_argument('--only', nargs='*', default=None, help='substrings of checkpoint names to generate')
    ap.add_argument('--manifests', default=MANIFESTS)
    a = ap.parse_args()
    import time
    for i, (name, fn) in enumerate(CHECKPOINTS):
        if a.only and not any(s in name for s in a.only):
            continue
        ckpt = name.split(':')[0]
        t0 = time.time()
        print(f'== {name}', flush=True)
        fn(a.out, ckpt, a.seed * 1000 + i, manifest(ckpt, a.manifests))
        print(f'   {name}: {time.time() - t0:.0f} s', flush=True)
