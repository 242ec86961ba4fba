"""Alternate fixture sets for the sparse modules, recorded from the ORIGINAL TRELLIS code.

    OMP_NUM_THREADS=1 TRELLIS_ORIG=/path/to/TRELLIS python gen_sparse.py OUT_ROOT --seed 1 --profile 1

writes, under OUT_ROOT/modules/, fixtures in the format of shared/reference (README.md there):
config.json, model.safetensors (the module's state_dict, keys unchanged), io.safetensors and
meta.json (kind, every tensor with shape / dtype / desc / tolerance). Directory names start with
`sp_` so that they do not collide with the dense fixtures another generator writes into the same
root. Kinds: module:SparseConv3d, module:sparse_spatial, module:SparseMultiHeadAttention (self
full, cross to a dense context, windowed with and without shift).

Everything is deterministic from --seed; --profile picks the sizes (profile 1: batch 3, window 4
and 8, 32^3 grids; profile 2: batch 1 / 3, other channel and head counts, 16^3 / 24^3 grids).
Parameters are overwritten as the reference README says: linear / conv weights N(0, 1/fan_in),
biases N(0, 0.05^2) (0.1 for the conv module), norm weights 1 + N(0, s^2), RMS gammas
1 + N(0, 0.3^2); buffers stay as the original makes them.

ALWAYS run with OMP_NUM_THREADS=1: spconv 2.3.8's CPU scatter_add races between OpenMP threads.
The helpers here (init_params, rand_coords, write_fixture) are shared with gen_slat_models.py.
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *  # noqa: E402,F401,F403  (sets up the original TRELLIS on CPU)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

if os.environ.get('OMP_NUM_THREADS') != '1':
    sys.exit('run with OMP_NUM_THREADS=1 (spconv CPU scatter_add data race)')
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# shared helpers

def init_params(module, g, norm_std=0.2, gamma_std=0.3, bias_std=0.05):
    """Overwrites every parameter of `module` (buffers untouched), deterministically from `g`."""
    for mod in module.modules():
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
        for name, p in mod.named_parameters(recurse=False):
            shape = p.shape
            if name == 'gamma':
                v = 1 + gamma_std * torch.randn(shape, generator=g)
            elif is_norm and name == 'weight':
                v = 1 + norm_std * torch.randn(shape, generator=g)
            elif name == 'bias':
                v = bias_std * torch.randn(shape, generator=g)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                v = torch.randn(shape, generator=g) / fan_in ** 0.5
            else:
                raise ValueError(f'no init rule for {type(mod).__name__}.{name} {tuple(shape)}')
            with torch.no_grad():
                p.copy_(v.to(p.dtype))


def rand_coords(g, counts, lo, hi, order='sorted'):
    """`counts[b]` distinct voxels per batch element inside the box [lo, hi)^3, batch blocks
    contiguous; within a block sorted lexicographically or in random order."""
    side = hi - lo
    rows = []
    for b, n in enumerate(counts):
        assert n <= side ** 3
        idx = torch.randperm(side ** 3, generator=g)[:n]
        if order == 'sorted':
            idx = idx.sort().values
        xyz = torch.stack([idx // (side * side), (idx // side) % side, idx % side], 1) + lo
        rows.append(torch.cat([torch.full((n, 1), b, dtype=torch.long), xyz], 1))
    return torch.cat(rows).int()


def blob_coords(g, counts, res, order='sorted', fill=0.55):
    """Voxels of a random blob per batch element (a union of balls inside [0, res)^3), so that
    sparse convolutions see many neighbours; `counts[b]` voxels are drawn from the blob."""
    rows = []
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing='ij'), -1).reshape(-1, 3)
    for b, n in enumerate(counts):
        inside = torch.zeros(grid.shape[0], dtype=torch.bool)
        while int(inside.sum()) < n / fill:
            c = torch.rand(3, generator=g) * (res - 1)
            r = 1.5 + torch.rand(1, generator=g).item() * res / 4
            inside |= ((grid.float() - c) ** 2).sum(1) <= r * r
        cand = inside.nonzero()[:, 0]
        idx = cand[torch.randperm(cand.shape[0], generator=g)[:n]]
        if order == 'sorted':
            idx = idx.sort().values
        rows.append(torch.cat([torch.full((n, 1), b, dtype=torch.long), grid[idx]], 1))
    return torch.cat(rows).int()


def window_filled_coords(g, windows_per_batch, res, ws):
    """Exactly `ws` voxels in each of `windows_per_batch[b]` random ws^3 cells per batch element,
    sorted: every window of a shift-0 partition then holds `window_size` voxels, the case where the
    original takes its dense "all windows full" path (flash_attn_qkvpacked_func)."""
    n = res // ws
    rows = []
    for b, nw in enumerate(windows_per_batch):
        cells = torch.randperm(n ** 3, generator=g)[:nw]
        for c in cells.tolist():
            base = torch.tensor([c // (n * n), (c // n) % n, c % n]) * ws
            local = torch.randperm(ws ** 3, generator=g)[:ws]
            xyz = base + torch.stack([local // (ws * ws), (local // ws) % ws, local % ws], 1)
            rows.append(torch.cat([torch.full((ws, 1), b, dtype=torch.long), xyz], 1))
    c = torch.cat(rows)
    key = ((c[:, 0] * res + c[:, 1]) * res + c[:, 2]) * res + c[:, 3]
    return c[key.argsort()].int()


def dtype_name(t):
    return str(t.dtype).replace('torch.', '')


def write_fixture(root, sub, kind, io, info, cfg=None, state_dict=None, extra=None, files=None):
    """Writes one fixture directory. `info[name] = (desc, tolerance or None)` for every tensor of
    `io` (in that order); `extra` = further meta.json keys; `files` = {name: bytes}."""
    d = os.path.join(root, sub)
    os.makedirs(d, exist_ok=True)
    meta = {'kind': kind}
    meta.update(extra or {})
    tensors = {}
    for name, t in io.items():
        desc, tol = info.get(name, ('', None))
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f'{sub}/{name}: not finite'
            assert t.numel() < 2 or float(t.float().std()) > 0, f'{sub}/{name}: constant'
        e = {'shape': list(t.shape), 'dtype': dtype_name(t), 'desc': desc}
        if tol is not None:
            e['tolerance'] = tol
        tensors[name] = e
    meta['tensors'] = tensors
    if state_dict is not None:
        meta['num_state_dict_entries'] = len(state_dict)
        meta['state_dict_dtypes'] = sorted({dtype_name(v) for v in state_dict.values()})
        save_file({k: v.contiguous().clone() for k, v in state_dict.items()}, os.path.join(d, 'model.safetensors'))
    if cfg is not None:
        json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'), indent=2)
    save_file({k: v.contiguous().clone() for k, v in io.items()}, os.path.join(d, 'io.safetensors'))
    for name, data in (files or {}).items():
        open(os.path.join(d, name), 'wb').write(data)
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'), indent=1)
    print(f'{sub:40s} {kind:36s} ' + ' '.join(f'{k}{list(v.shape)}' for k, v in list(io.items())[:4]))


# ---------------------------------------------------------------------------------------------
# modules

def gen_conv(root, sub, g, cin, cout, k, coords):
    from trellis.modules import sparse as sp
    args = {'in_channels': cin, 'out_channels': cout, 'kernel_size': k}
    m = sp.SparseConv3d(**args)
    init_params(m, g, bias_std=0.1)
    m.conv.train()  # spconv's CPU path refuses a fused bias in inference mode
    feats = torch.randn(coords.shape[0], cin, generator=g)
    out = m(sp.SparseTensor(feats=feats, coords=coords)).feats
    # independent dense recomputation (kernel axes = x, y, z offsets, cross-correlation)
    w = m.conv.weight.permute(0, 4, 1, 2, 3).contiguous()
    B = int(coords[:, 0].max()) + 1
    R = int(coords[:, 1:].max()) + 1
    dense = torch.zeros(B, cin, R, R, R)
    c = coords.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    dout = torch.nn.functional.conv3d(dense, w, m.conv.bias, padding=k // 2)
    at_sites = dout[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    io = {'coords': coords, 'feats_in': feats, 'feats_out': out, 'dense_weight_oixyz': w}
    extra = {}
    if k == 1:
        # spconv's "conv1x1" shortcut reads the [Cout,1,1,1,Cin] weight memory as [Cin, Cout]
        quirk = feats @ m.conv.weight.reshape(cin, cout) + m.conv.bias
        err = rel(out, quirk)
        assert err < 1e-6, err
        extra['conv1x1_quirk'] = ('kernel_size 1: spconv takes its conv1x1 shortcut, out = feats @ '
                                  'conv.weight.view(Cin, Cout) + bias (the weight memory read as [Cin, Cout], '
                                  'NOT the dense conv3d with dense_weight_oixyz); rel L2 to that formula: %.2e' % err)
        extra['dense_conv3d_rel_l2_to_out'] = rel(out, at_sites)
    else:
        err = rel(out, at_sites)
        assert err < 1e-5, err
        io['dense_out_at_sites'] = at_sites
        extra['dense_vs_sparse_rel_l2'] = err
    info = {'coords': ('int32 [N,4] (b,x,y,z), random order within each batch block', None),
            'feats_in': ('input feats [N,Cin]', None),
            'feats_out': ('SparseConv3d output feats [N,Cout] in coords order', 'rel_l2 1e-5'),
            'dense_weight_oixyz': ('conv.weight.permute(0,4,1,2,3) [Cout,Cin,k,k,k], kernel dims (x,y,z)', None),
            'dense_out_at_sites': (f'dense conv3d(padding={k // 2}) sampled at coords; equals feats_out', None)}
    extra.update({'grid_resolution': R, 'batch_size': B,
             'coords_order': 'random within each batch block; output keeps the input order'})
    write_fixture(root, sub, 'module:SparseConv3d', io, info, {'name': 'SparseConv3d', 'args': args},
                  m.state_dict(), extra)


def gen_spatial(root, sub, g, channels, coords):
    from trellis.modules import sparse as sp
    feats = torch.randn(coords.shape[0], channels, generator=g)
    x = sp.SparseTensor(feats=feats, coords=coords)
    d = sp.SparseDownsample(2)(x)
    inv = d.get_spatial_cache('upsample_(2, 2, 2)_idx')
    assert inv is not None
    up_in = torch.randn(d.feats.shape[0], channels, generator=g)
    u = sp.SparseUpsample(2)(d.replace(up_in))
    s = sp.SparseSubdivide()(x)
    io = {'coords_in': coords, 'feats_in': feats, 'down_coords': d.coords.int(), 'down_feats': d.feats,
          'down_inverse_idx': inv.long(), 'up_feats_in': up_in, 'up_coords': u.coords.int(),
          'up_feats': u.feats, 'subdiv_coords': s.coords.int(), 'subdiv_feats': s.feats}
    info = {'coords_in': ('int32 [N,4], random order inside each batch block', None),
            'feats_in': ('[N,C]', None),
            'down_coords': ('int32 [M,4], SparseDownsample(2) coords', None),
            'down_feats': ('[M,C] mean of the children', 'rel_l2 1e-6'),
            'down_inverse_idx': ('int64 [N] output row of each input voxel', None),
            'up_feats_in': ('random feats on down_coords, input of SparseUpsample(2)', None),
            'up_coords': ('== coords_in', None),
            'up_feats': ('up_feats_in[down_inverse_idx]', 'exact'),
            'subdiv_coords': ('int32 [8N,4], child j = 4dx+2dy+dz at row 8i+j', None),
            'subdiv_feats': ('[8N,C]', 'exact')}
    extra = {'grid_resolution': int(coords[:, 1:].max()) + 1,
             'modules': 'SparseDownsample(2), SparseUpsample(2) (paired), SparseSubdivide()'}
    write_fixture(root, sub, 'module:sparse_spatial', io, info, extra=extra)


def gen_attention(root, sub, g, args, coords, ctx_len=None):
    from trellis.modules import sparse as sp
    from trellis.modules.sparse.attention.windowed_attn import calc_window_partition
    m = sp.SparseMultiHeadAttention(**args)
    init_params(m, g, gamma_std=0.3)
    m.eval()
    C, H = args['channels'], args['num_heads']
    N = coords.shape[0]
    x = torch.randn(N, C, generator=g)
    X = sp.SparseTensor(feats=x, coords=coords)
    io = {'coords': coords, 'x': x}
    info = {'coords': ('int32 [N,4]', None), 'x': ('input feats [N,C]', None)}
    rec = {}
    if args.get('type', 'self') == 'self':
        m.to_qkv.register_forward_hook(lambda mod, i, o: rec.__setitem__('qkv', o.reshape(N, 3, H, C // H).clone()))
        if args.get('qk_rms_norm'):
            m.q_rms_norm.register_forward_hook(lambda mod, i, o: rec.__setitem__('q_normed', o.feats.clone()))
            m.k_rms_norm.register_forward_hook(lambda mod, i, o: rec.__setitem__('k_normed', o.feats.clone()))
        out = m(X).feats
    else:
        B = int(coords[:, 0].max()) + 1
        ctx = torch.randn(B, ctx_len, args['ctx_channels'], generator=g)
        io['context'] = ctx
        info['context'] = ('dense context [B, L, ctx_channels]', None)
        out = m(X, ctx).feats
    io['out'] = out
    info['out'] = ('module output feats [N,C]', 'rel_l2 1e-5')
    for k in ('qkv', 'q_normed', 'k_normed'):
        if k in rec:
            io[k] = rec[k]
    info['qkv'] = ('to_qkv output reshaped [N,3,H,D]', None)
    info['q_normed'] = ('after q_rms_norm [N,H,D]', None)
    info['k_normed'] = ('after k_rms_norm [N,H,D]', None)
    extra = {'grid_resolution': int(coords[:, 1:].max()) + 1,
             'batch_size': int(coords[:, 0].max()) + 1}
    if args.get('attn_mode') == 'windowed':
        ws, shift = args['window_size'], args['shift_window']
        _, _, lens, batch = calc_window_partition(X, ws, shift)
        io['window_xyz'] = ((coords[:, 1:] + shift) // ws).int()
        io['window_seq_lens'] = torch.tensor(lens, dtype=torch.int32)
        io['window_seq_batch'] = torch.tensor(batch, dtype=torch.int32)
        info['window_xyz'] = ('int32 [N,3] window index of each voxel (after shift)', None)
        info['window_seq_lens'] = ('voxel count of each non-empty window in partition order', None)
        info['window_seq_batch'] = ('batch index of each non-empty window', None)
        extra['window_rule'] = ('window = (coords[:,1:] + shift) // window_size per axis; full attention '
                                'inside each (batch, window) group; output in input order')
    write_fixture(root, sub, 'module:SparseMultiHeadAttention', io, info,
                  {'name': 'SparseMultiHeadAttention', 'args': args}, m.state_dict(), extra)


def modules_profile(root, seed, profile):
    g = torch.Generator().manual_seed(seed)
    M = os.path.join(root, 'modules')
    if profile == 1:
        gen_conv(M, 'sp_conv_b3', g, 8, 12, 3, blob_coords(g, [150, 220, 90], 32, order='random'))
        gen_conv(M, 'sp_conv_k1', g, 20, 6, 1, rand_coords(g, [60, 40], 2, 14, order='random'))
        gen_spatial(M, 'sp_spatial_b3', g, 5, blob_coords(g, [120, 200, 75], 32, order='random'))
        sc = rand_coords(g, [1, 61, 12], 0, 16)  # a batch element of one voxel
        gen_attention(M, 'sp_attn_self_full_b3', g, {'channels': 48, 'num_heads': 3, 'type': 'self',
                      'attn_mode': 'full', 'qk_rms_norm': True}, sc)
        gen_attention(M, 'sp_attn_cross_b3', g, {'channels': 48, 'num_heads': 6, 'ctx_channels': 20,
                      'type': 'cross', 'attn_mode': 'full', 'qk_rms_norm': False}, sc, ctx_len=7)
        wc = blob_coords(g, [230, 170, 140], 24)
        for ws, sh in [(4, 0), (4, 2), (8, 4)]:
            gen_attention(M, f'sp_attn_swin_w{ws}_s{sh}_b3', g, {'channels': 32, 'num_heads': 2, 'type': 'self',
                          'attn_mode': 'windowed', 'window_size': ws, 'shift_window': sh,
                          'qk_rms_norm': False}, wc)
        gen_attention(M, 'sp_attn_swin_w4_s0_allfull_b2', g, {'channels': 32, 'num_heads': 4, 'type': 'self',
                      'attn_mode': 'windowed', 'window_size': 4, 'shift_window': 0,
                      'qk_rms_norm': True}, window_filled_coords(g, [9, 5], 16, 4))
    else:
        gen_conv(M, 'sp_conv_b1', g, 24, 16, 3, blob_coords(g, [700], 16, order='random'))
        gen_conv(M, 'sp_conv_k1_b3', g, 12, 7, 1, rand_coords(g, [30, 10, 45], 0, 24, order='random'))
        gen_spatial(M, 'sp_spatial_b1', g, 9, blob_coords(g, [333], 24, order='random'))
        sc = rand_coords(g, [71], 3, 19)
        gen_attention(M, 'sp_attn_self_full_b1', g, {'channels': 64, 'num_heads': 2, 'type': 'self',
                      'attn_mode': 'full', 'qk_rms_norm': True}, sc)
        gen_attention(M, 'sp_attn_self_full_nonorm_b3', g, {'channels': 32, 'num_heads': 4, 'type': 'self',
                      'attn_mode': 'full', 'qk_rms_norm': False}, rand_coords(g, [5, 40, 17], 0, 8))
        gen_attention(M, 'sp_attn_cross_b1', g, {'channels': 64, 'num_heads': 8, 'ctx_channels': 40,
                      'type': 'cross', 'attn_mode': 'full', 'qk_rms_norm': False}, sc, ctx_len=13)
        wc = blob_coords(g, [510], 24)
        for ws, sh in [(8, 0), (4, 2), (8, 4)]:
            gen_attention(M, f'sp_attn_swin_w{ws}_s{sh}_b1', g, {'channels': 48, 'num_heads': 4, 'type': 'self',
                          'attn_mode': 'windowed', 'window_size': ws, 'shift_window': sh,
                          'qk_rms_norm': ws == 4}, wc)
        wc3 = rand_coords(g, [90, 150, 60], 0, 16)
        gen_attention(M, 'sp_attn_swin_w4_s0_b3', g, {'channels': 32, 'num_heads': 1, 'type': 'self',
                      'attn_mode': 'windowed', 'window_size': 4, 'shift_window': 0,
                      'qk_rms_norm': False}, wc3)
        # a batch element without voxels (batch indices 0 and 2 only)
        gc = rand_coords(g, [20, 0, 15], 0, 16)
        gen_attention(M, 'sp_attn_self_full_gap_b3', g, {'channels': 32, 'num_heads': 2, 'type': 'self',
                      'attn_mode': 'full', 'qk_rms_norm': True}, gc)
        gen_attention(M, 'sp_attn_cross_gap_b3', g, {'channels': 32, 'num_heads': 2, 'ctx_channels': 16,
                      'type': 'cross', 'attn_mode': 'full', 'qk_rms_norm': False}, gc, ctx_len=5)
        gen_attention(M, 'sp_attn_swin_w8_s4_gap_b3', g, {'channels': 32, 'num_heads': 2, 'type': 'self',
                      'attn_mode': 'windowed', 'window_size': 8, 'shift_window': 4,
                      'qk_rms_norm': False}, gc)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('out')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--profile', type=int, choices=[1, 2], default=1)
    a = ap.parse_args()
    modules_profile(a.out, a.seed, a.profile)
