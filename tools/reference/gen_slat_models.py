"""Alternate fixture sets for the structured-latent networks, recorded from the ORIGINAL TRELLIS code.

    OMP_NUM_THREADS=1 TRELLIS_ORIG=/path/to/TRELLIS UTILS3D=/path/to/utils3d \\
        python gen_slat_models.py OUT_ROOT --seed 1 --profile 1

writes OUT_ROOT/models/slat_* fixtures in the format of shared/reference (README.md there) for
model:SLatFlowModel (a float32 fixture with every block's output, and a use_fp16 one with
out_mixed_fp16 / out_fp32_same_weights), model:SLatEncoder, model:SLatGaussianDecoder (+ the
Gaussian.save_ply file of batch element 0), model:SLatRadianceFieldDecoder and
model:SLatMeshDecoder (FlexiCubes meshes and the grid-vertex tensors of sparse_cube2verts).

Deterministic from --seed; --profile picks the configurations (profile 1: batch 3, two io stages
with one res block each, swin window 4, 3 blocks; profile 2: batch 1, io stages with two res blocks,
resolution 32 / 12, window 8, coords in random order for the flow, an fp16 decoder). Parameters are
overwritten as gen_sparse.init_params does (README rules). use_fp16 fixtures: the float32 weights
loaded into the model built with use_fp16=True, whose state_dict is saved as that conversion
leaves it. UTILS3D (a checkout of utils3d at the commit TRELLIS pins) provides the quaternion
helpers Gaussian.save_ply calls; without it the .ply file is not written.

ALWAYS run with OMP_NUM_THREADS=1 (spconv 2.3.8's CPU scatter_add races between threads).
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import hashlib
import io as _io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_sparse import init_params, rand_coords, blob_coords, write_fixture  # noqa: E402
from common import rel, run_mesh_decoder  # noqa: E402
import torch  # noqa: E402

OUT_DESC = 'intermediate (SparseTensor feats/coords) output of the named block'


def make(name, args, g, norm_std=0.3):
    from trellis import models
    import spconv.pytorch as spconv
    m = getattr(models, name)(**args)
    init_params(m, g, norm_std=norm_std, gamma_std=0.3)
    m.eval()
    for mod in m.modules():
        if isinstance(mod, spconv.conv.SparseConvolution):
            mod.train()  # spconv's CPU path refuses a fused bias in inference mode
    return m


def as_fp16(name, args, sd32):
    """The model built with use_fp16=True holding the float32 weights `sd32` (rounded where the
    original converts), and the float32 model built from that state_dict."""
    from trellis import models
    import spconv.pytorch as spconv
    m16 = getattr(models, name)(**dict(args, use_fp16=True))
    m16.load_state_dict(sd32)
    sd16 = m16.state_dict()
    m32 = getattr(models, name)(**dict(args, use_fp16=False))
    m32.load_state_dict({k: v.float() for k, v in sd16.items()})
    for m in (m16, m32):
        m.eval()
        for mod in m.modules():
            if isinstance(mod, spconv.conv.SparseConvolution):
                mod.train()
    return m16, m32, sd16


def hook_blocks(blocks, prefix, rec):
    for i, b in enumerate(blocks):
        def h(mod, inp, out, name=f'{prefix}{i}'):
            rec[f'{name}_feats'] = out.feats.float().clone()
            rec[f'{name}_coords'] = out.coords.int().clone()
        b.register_forward_hook(h)


def fp16_meta(sd16):
    return {'fp16_tensors': sorted(k for k, v in sd16.items() if v.dtype == torch.float16),
            'fp32_tensors': sorted(k for k, v in sd16.items() if v.dtype != torch.float16),
            'num_parameters': sum(v.numel() for v in sd16.values())}


# ---------------------------------------------------------------------------------------------

_SCALE_PATCHED = False


def patch_downsample_scale():
    """UPSTREAM BUG, patched for multi-stage flows: SparseDownsample sets `_scale = s // f`, so
    the scale of a once-downsampled tensor is 1 // 2 = 0 and that of a twice-downsampled one is
    0 // 2 = 0 again: both downsamples register their upsample caches under the same key
    "(0, 0, 0)", the second overwrites the first, and the second SparseUpsample of an
    SLatFlowModel with two io stages restores the *middle* coords (the original's output then
    has the coarse row count, e.g. 240 rows for 600 input voxels, and with num_io_res_blocks 2 the
    skip concatenation fails). The patch re-keys each downsample's cache under its exact
    fractional scale (1/2, 1/4, ...), which is what the per-scale cache intends; nothing else
    changes. Single-stage models (every official config) are unaffected."""
    global _SCALE_PATCHED
    if _SCALE_PATCHED:
        return
    from fractions import Fraction
    from trellis.modules.sparse import spatial
    down = spatial.SparseDownsample.forward

    def forward(self, input):
        out = down(self, input)
        f = self.factor if isinstance(self.factor, tuple) else (self.factor,) * 3
        exact = tuple(Fraction(s) / k for s, k in zip(input._scale, f))
        moved = out._spatial_cache.pop(str(out._scale))
        out._scale = exact
        for k, v in moved.items():
            out.register_spatial_cache(k, v)
        return out
    spatial.SparseDownsample.forward = forward
    _SCALE_PATCHED = True


def gen_flow(root, sub, g, args, coords, cond_len, fp16=False):
    from trellis.modules import sparse as sp
    cfg = {'name': 'SLatFlowModel', 'args': dict(args, use_fp16=fp16)}
    patched = len(args['io_block_channels']) > 1
    if patched:
        patch_downsample_scale()
    m = make('SLatFlowModel', dict(args, use_fp16=False), g)
    B = int(coords[:, 0].max()) + 1
    feats = torch.randn(coords.shape[0], args['in_channels'], generator=g)
    t = torch.rand(B, generator=g) * 1000
    cond = torch.randn(B, cond_len, args['cond_channels'], generator=g)
    x = sp.SparseTensor(feats=feats, coords=coords)
    io = {'coords': coords, 'feats': feats, 't': t, 'cond': cond}
    info = {'coords': ('int32 [N,4]', None), 'feats': ('noisy slat feats [N,C]', None),
            't': ('1000*t', None), 'cond': ('[B,L,cond_channels]', None)}
    extra = {'conventions': 't is 1000*t; input_layer -> input_blocks (last of each stage downsamples '
                            'first) -> + APE(coarse coords) -> blocks -> out_blocks (first of each stage '
                            'upsamples; input cat([h, skip])) -> F.layer_norm -> out_layer.'}
    if patched:
        extra['upstream_patch'] = ('two io stages: the original SparseDownsample computes the scale as '
                                   's // 2 (1 // 2 = 0 = 0 // 2), so both downsamples share one upsample '
                                   'cache slot and the second upsample restores the wrong coords (the '
                                   'unpatched output has the coarse row count). Recorded with each '
                                   'downsample cache keyed by its exact scale (1/2, 1/4): the intended '
                                   'multi-stage U-Net. No official config has two io stages.')
    if fp16:
        m16, m32, sd = as_fp16('SLatFlowModel', args, m.state_dict())
        io['out_mixed_fp16'] = m16(x, t, cond).feats.float()
        io['out_fp32_same_weights'] = m32(x, t, cond).feats
        info['out_mixed_fp16'] = ('use_fp16 forward on CPU (float16 torso)', 'rel_l2 ~1e-2')
        info['out_fp32_same_weights'] = ('same (fp16-rounded) weights, all float32', 'rel_l2 1e-5')
        extra.update(fp16_meta(sd))
        extra['observed_rel_l2_mixed_vs_fp32'] = rel(io['out_mixed_fp16'], io['out_fp32_same_weights'])
    else:
        sd = m.state_dict()
        rec = {}
        hook_blocks(m.input_blocks, 'input_block', rec)
        hook_blocks(m.blocks, 'block', rec)
        hook_blocks(m.out_blocks, 'out_block', rec)
        io['out'] = m(x, t, cond).feats
        info['out'] = ('predicted velocity feats [N,C] (same coords/order)', 'rel_l2 1e-5')
        io['t_emb'] = m.t_embedder(t)
        for group in ('input_block', 'block', 'out_block'):
            for k in sorted((k for k in rec if k.startswith(group)), key=lambda k: (int(k[len(group):].split('_')[0]), k)):
                io[k] = rec[k]
                info[k] = (OUT_DESC, None)
        extra['num_parameters'] = sum(v.numel() for v in sd.values())
    write_fixture(root, sub, 'model:SLatFlowModel', io, info, cfg, sd, extra)


def gen_encoder(root, sub, g, args, coords):
    from trellis.modules import sparse as sp
    m = make('SLatEncoder', args, g)
    feats = torch.randn(coords.shape[0], args['in_channels'], generator=g)
    rec = {}
    hook_blocks(m.blocks, 'block', rec)
    z, mean, logvar = m(sp.SparseTensor(feats=feats, coords=coords), sample_posterior=False, return_raw=True)
    io = {'coords': coords, 'feats': feats, 'z': z.feats, 'mean': mean, 'logvar': logvar}
    info = {'coords': ('int32 [N,4]', None), 'feats': ('input per-voxel features [N,in_channels]', None),
            'z': ('sample_posterior=False: z = mean', 'rel_l2 1e-5')}
    for k in sorted(rec):
        io[k] = rec[k]
    extra = {'conventions': f'swin window {args["window_size"]}: block i shifts by (window//2)*(i%2)'}
    write_fixture(root, sub, 'model:SLatEncoder', io, info, {'name': 'SLatEncoder', 'args': args},
                  m.state_dict(), extra)


def decoder_model(name, args, g):
    """The decoder to record and its state_dict (use_fp16: the converted one)."""
    if not args.get('use_fp16'):
        m = make(name, args, g)
        return m, m.state_dict()
    m = make(name, dict(args, use_fp16=False), g)
    m16, _, sd = as_fp16(name, args, m.state_dict())
    return m16, sd


def save_ply_bytes(rep):
    """Gaussian.save_ply of the original, with the real utils3d (UTILS3D) in place of common.py's
    stand-in while it runs (utils3d loads its submodules lazily)."""
    path = os.environ.get('UTILS3D')
    if not path:
        return None
    import types
    import importlib
    from trellis.representations.gaussian import gaussian_model
    is_u3 = lambda k: k == 'utils3d' or k.startswith('utils3d.')  # noqa: E731
    mocked = {k: sys.modules.pop(k) for k in list(sys.modules) if is_u3(k)}
    sys.path.insert(0, path)
    before = gaussian_model.utils3d
    try:
        gaussian_model.utils3d = types.SimpleNamespace(numpy=importlib.import_module('utils3d.numpy'))
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, 'g.ply')
            rep.save_ply(p)
            return open(p, 'rb').read()
    finally:
        gaussian_model.utils3d = before
        sys.path.remove(path)
        for k in [k for k in sys.modules if is_u3(k)]:
            del sys.modules[k]
        sys.modules.update(mocked)


def gen_gs_decoder(root, sub, g, args, coords):
    from trellis.modules import sparse as sp
    m, sd = decoder_model('SLatGaussianDecoder', args, g)
    feats = torch.randn(coords.shape[0], args['latent_channels'], generator=g)
    rec = {}
    hook_blocks(m.blocks, 'block', rec)
    m.out_layer.register_forward_hook(lambda mod, i, o: rec.__setitem__('raw_out', o.feats.float().clone()))
    reps = m(sp.SparseTensor(feats=feats, coords=coords))
    io = {'coords': coords, 'feats': feats}
    for k in sorted(k for k in rec if k.startswith('block')):
        io[k] = rec[k]
    io['raw_out'] = rec['raw_out']
    io['offset_perturbation'] = m.offset_perturbation.float()
    info = {'raw_out': ('out_layer output feats [N, out_channels]', 'rel_l2 1e-5'),
            'offset_perturbation': ('buffer [G,3]', None)}
    for i, r in enumerate(reps):
        for k in ('xyz', 'features_dc', 'scaling', 'rotation', 'opacity'):
            io[f'g{i}_{k}'] = getattr(r, f'_{k}').float()
        for k in ('get_xyz', 'get_scaling', 'get_rotation', 'get_opacity', 'get_features'):
            io[f'g{i}_{k}'] = getattr(r, k).float()
    extra = {'conventions': 'raw_out per voxel [_xyz G*3 | _features_dc G*3 | _scaling G*3 | _rotation G*4 | '
                            '_opacity G]; g{i}_* = to_representation of batch element i'}
    files = {}
    ply = save_ply_bytes(reps[0])
    if ply is not None:
        files['gaussian0.ply'] = ply
        extra['ply'] = {'file': 'gaussian0.ply', 'of': 'g0_* representation',
                        'writer': 'Gaussian.save_ply(path) with the default transform',
                        'sha256': hashlib.sha256(ply).hexdigest()}
    write_fixture(root, sub, 'model:SLatGaussianDecoder', io, info,
                  {'name': 'SLatGaussianDecoder', 'args': args}, sd, extra, files)


def gen_rf_decoder(root, sub, g, args, coords):
    from trellis.modules import sparse as sp
    m, sd = decoder_model('SLatRadianceFieldDecoder', args, g)
    feats = torch.randn(coords.shape[0], args['latent_channels'], generator=g)
    rec = {}
    m.out_layer.register_forward_hook(lambda mod, i, o: rec.__setitem__('raw_out', o.feats.float().clone()))
    reps = m(sp.SparseTensor(feats=feats, coords=coords))
    io = {'coords': coords, 'feats': feats, 'raw_out': rec['raw_out']}
    for i, r in enumerate(reps):
        io[f'rf{i}_position'] = r.position.float()
        io[f'rf{i}_depth'] = r.depth
        for k in ('trivec', 'density', 'features_dc'):
            io[f'rf{i}_{k}'] = getattr(r, k).float()
    info = {'raw_out': ('out_layer output [N, out_channels]', 'rel_l2 1e-5')}
    write_fixture(root, sub, 'model:SLatRadianceFieldDecoder', io, info,
                  {'name': 'SLatRadianceFieldDecoder', 'args': args}, sd,
                  {'conventions': 'raw_out per voxel [trivec R*3*D | density R | features_dc R*3]; '
                                  'trivec += 1; depth = int(log2(resolution))'})


def gen_mesh_decoder(root, sub, g, args, coords):
    from trellis.modules import sparse as sp
    m, sd = decoder_model('SLatMeshDecoder', args, g)
    feats = torch.randn(coords.shape[0], args['latent_channels'], generator=g)
    rec, meshes = run_mesh_decoder(m, sp.SparseTensor(feats=feats, coords=coords))
    res = m.mesh_extractor.res
    io = {'coords': coords, 'feats': feats}
    io.update((k, rec[k]) for k in sorted(k for k in rec if k.startswith('upsample')))
    io.update((k, v) for k, v in rec.items() if not k.startswith('upsample'))
    for b, mesh in enumerate(meshes):
        assert mesh.success, f'{sub}: empty mesh for batch element {b}'
    info = {'raw_out': ('out_layer output on the subdivided coords, before the in-place sdf bias', 'rel_l2 1e-5'),
            'raw_out_coords': ('int32 coords of the subdivided (x4) voxels', None)}
    write_fixture(root, sub, 'model:SLatMeshDecoder', io, info,
                  {'name': 'SLatMeshDecoder', 'args': args}, sd,
                  {'mesh_resolution': res,
                   'conventions': 'meshes: FlexiCubes per batch element at 4*resolution; compare '
                                  'order-independently; grid_vertex_* = sparse_cube2verts output'})


# ---------------------------------------------------------------------------------------------

GS_REP = {'lr': {'_xyz': 1.0, '_features_dc': 1.0, '_opacity': 1.0, '_scaling': 1.0, '_rotation': 0.1},
          'perturb_offset': True, 'voxel_size': 1.5, 'num_gaussians': 32, '2d_filter_kernel_size': 0.1,
          '3d_filter_kernel_size': 0.0009, 'scaling_bias': 0.004, 'opacity_bias': 0.1,
          'scaling_activation': 'softplus'}


def vae(res, model, latent, blocks, heads, mlp, window, fp16=False, **kw):
    a = {'resolution': res, 'model_channels': model, 'latent_channels': latent, 'num_blocks': blocks,
         'num_heads': heads, 'mlp_ratio': mlp, 'attn_mode': 'swin', 'window_size': window, 'use_fp16': fp16}
    a.update(kw)
    return a


def flow(res, model, cond, blocks, heads, patch, nio, io_ch, **kw):
    a = {'resolution': res, 'in_channels': 8, 'out_channels': 8, 'model_channels': model,
         'cond_channels': cond, 'num_blocks': blocks, 'num_heads': heads, 'mlp_ratio': 4,
         'patch_size': patch, 'num_io_res_blocks': nio, 'io_block_channels': io_ch, 'pe_mode': 'ape',
         'qk_rms_norm': True, 'use_fp16': False}
    a.update(kw)
    return a


def models_profile(root, seed, profile):
    g = torch.Generator().manual_seed(seed)
    M = os.path.join(root, 'models')
    if profile == 1:
        fa = flow(16, 48, 24, 2, 3, 4, 1, [16, 32])
        gen_flow(M, 'slat_flow_io2_b3', g, fa, blob_coords(g, [300, 180, 120], 16), 7)
        gen_flow(M, 'slat_flow_io2_b3_fp16', g, fa, blob_coords(g, [140, 90, 200], 16), 7, fp16=True)
        gen_encoder(M, 'slat_encoder_w4_b3', g, dict(vae(16, 48, 6, 3, 3, 4, 4), in_channels=24),
                    blob_coords(g, [150, 90, 60], 16))
        gen_encoder(M, 'slat_encoder_fp16_b3', g, dict(vae(16, 64, 8, 2, 4, 4, 8, fp16=True), in_channels=32),
                    blob_coords(g, [100, 35, 140], 16))
        gen_gs_decoder(M, 'slat_gs_decoder_hc_b2', g,
                       {'resolution': 16, 'model_channels': 48, 'latent_channels': 8, 'num_blocks': 2,
                        'num_head_channels': 16, 'mlp_ratio': 2.5, 'attn_mode': 'swin', 'window_size': 8,
                        'use_fp16': False,
                        'representation_config': dict(GS_REP, num_gaussians=4, voxel_size=1.25, scaling_bias=0.01,
                                                      opacity_bias=0.2, lr=dict(GS_REP['lr'], _xyz=0.5))},
                       blob_coords(g, [40, 70], 16))
        gen_gs_decoder(M, 'slat_gs_decoder_w4_b3', g,
                       vae(16, 48, 6, 3, 2, 4, 4, representation_config=dict(GS_REP, num_gaussians=16)),
                       blob_coords(g, [70, 110, 40], 16))
        gen_rf_decoder(M, 'slat_rf_decoder_w4_b3', g,
                       vae(16, 48, 6, 3, 3, 4, 4, representation_config={'rank': 8, 'dim': 4}),
                       blob_coords(g, [80, 50, 120], 16))
        gen_mesh_decoder(M, 'slat_mesh_decoder_w4_b3', g,
                         vae(8, 256, 8, 3, 8, 1, 4, representation_config={'use_color': True}),
                         blob_coords(g, [30, 22, 15], 8))
        gen_rf_decoder(M, 'slat_rf_decoder_fp16_b3', g,
                       vae(16, 64, 8, 2, 4, 4, 8, fp16=True, representation_config={'rank': 4, 'dim': 2}),
                       blob_coords(g, [1, 60, 33], 16))
        gen_mesh_decoder(M, 'slat_mesh_decoder_1vox_b2', g,
                         vae(8, 256, 8, 2, 2, 1, 8, representation_config={'use_color': True}),
                         blob_coords(g, [1, 9], 8))
    else:
        gen_flow(M, 'slat_flow_io2_r2_b1', g, flow(32, 64, 16, 3, 2, 4, 2, [16, 32]),
                 blob_coords(g, [900], 32, order='random'), 5)
        gen_flow(M, 'slat_flow_b3_fp16', g, flow(16, 64, 40, 2, 4, 2, 1, [24]),
                 blob_coords(g, [120, 260, 75], 16), 9, fp16=True)
        gen_encoder(M, 'slat_encoder_w8_b1', g, dict(vae(32, 64, 8, 4, 4, 4, 8), in_channels=40),
                    blob_coords(g, [420], 32))
        gen_gs_decoder(M, 'slat_gs_decoder_w8_b1', g,
                       vae(32, 64, 8, 4, 2, 2, 8, representation_config=GS_REP),
                       blob_coords(g, [180], 32))
        gen_gs_decoder(M, 'slat_gs_decoder_fp16_b3', g,
                       vae(16, 64, 8, 2, 4, 4, 8, fp16=True, representation_config=dict(GS_REP, num_gaussians=8)),
                       blob_coords(g, [60, 45, 90], 16))
        gen_rf_decoder(M, 'slat_rf_decoder_r32_b1', g,
                       vae(32, 64, 8, 2, 4, 4, 8, representation_config={'rank': 16, 'dim': 8}),
                       blob_coords(g, [200], 32))
        fa = flow(64, 48, 24, 2, None, 2, 2, [24], use_skip_connection=False, mlp_ratio=2.5)
        del fa['num_heads']
        fa['num_head_channels'] = 16
        gen_flow(M, 'slat_flow_r64_noskip_hc_b2', g, fa, blob_coords(g, [330, 150], 64), 6)
        gen_encoder(M, 'slat_encoder_r64_qkrms_b2', g,
                    dict(vae(64, 64, 8, 2, 4, 4, 8, qk_rms_norm=True), in_channels=16),
                    blob_coords(g, [250, 180], 64))
        gen_mesh_decoder(M, 'slat_mesh_decoder_fp16_b2', g,
                         vae(8, 256, 8, 2, 4, 1, 8, fp16=True, representation_config={'use_color': True}),
                         blob_coords(g, [20, 14], 8))
        gen_mesh_decoder(M, 'slat_mesh_decoder_r12_b1', g,
                         vae(12, 256, 8, 2, 4, 1, 8, representation_config={'use_color': True}),
                         blob_coords(g, [55], 12))
        # a batch element without voxels (an empty sparse structure among num_samples > 1)
        gen_flow(M, 'slat_flow_gap_b3', g, flow(16, 32, 16, 1, 2, 2, 1, [16]), blob_coords(g, [120, 0, 80], 16), 4)
        gc = blob_coords(g, [30, 0, 20], 16)
        gen_gs_decoder(M, 'slat_gs_decoder_gap_b3', g,
                       vae(16, 32, 8, 2, 2, 4, 8, representation_config=dict(GS_REP, num_gaussians=4)), gc)
        gen_rf_decoder(M, 'slat_rf_decoder_gap_b3', g,
                       vae(16, 32, 8, 2, 2, 4, 8, representation_config={'rank': 4, 'dim': 2}), gc)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('out')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--profile', type=int, choices=[1, 2], default=1)
    a = ap.parse_args()
    models_profile(a.out, a.seed, a.profile)
