"""Alternate fixtures for the DENSE kinds, recorded by running the ORIGINAL TRELLIS code (see README.md here).

    python gen_dense.py OUT_ROOT SEED [--set 1|2|3]

Writes, under OUT_ROOT, fixtures in the format of shared/reference (config.json, model.safetensors,
io.safetensors, meta.json with the same tensor names and meta keys as the visible fixture of the same kind):

  modules/dn_*   module:MultiHeadAttention (self / cross / cross+qk_rms_norm), module:ModulatedTransformerCrossBlock,
                 module:TimestepEmbedder, module:AbsolutePositionEmbedder, module:norms, module:patchify
  models/dn_*    model:SparseStructureEncoder / SparseStructureDecoder / SparseStructureFlowModel (float32 with
                 intermediates, and use_fp16)

`--set` 1 and 2 pick one of two size/option tables (channels, heads, batch 1 and 3, resolutions, patch sizes, group
counts, qk_rms_norm_cross, share_mod, norm_type ...); `--set 3` writes SS VAE fixtures (models/dn_ss_*_blocks_*) that
also record the optional intermediates enc_block<k> / dec_block<k> of the reference README; SEED drives every random number (weights, inputs), so the
same arguments give the same files. Weights follow the reference README: linear/conv weights N(0, 1/fan_in),
biases N(0, 0.05^2), 1-D norm weights and RMS gammas 1 + N(0, s^2) with s in [0.1, 0.3]; buffers untouched.
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *  # noqa: E402,F401  (sets up the original TRELLIS on CPU)
from common import rel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {torch.float32: 'float32', torch.float16: 'float16', torch.int32: 'int32', torch.uint8: 'uint8',
          torch.int64: 'int64'}
FWD = 'rel_l2 1e-5'


class Gen:
    """A seeded torch generator plus the README's initialisation rules."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape, std=1.0):
        return torch.randn(*shape, generator=self.g) * std

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g)

    def randint(self, lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=self.g)

    def init_(self, module):
        """Overwrites every parameter of `module` in place (README rules); buffers are left alone."""
        for name, p in module.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            with torch.no_grad():
                if p.dim() >= 2 and leaf != 'gamma':
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(self.randn(*p.shape, std=1.0 / math.sqrt(fan_in)))
                elif leaf == 'bias':
                    p.copy_(self.randn(*p.shape, std=0.05))
                else:  # 1-D norm weights, RMS gammas [H, D]
                    s = 0.1 + 0.2 * float(self.rand(1))
                    p.copy_(1.0 + self.randn(*p.shape, std=s))
        return module


def tensor_meta(t, desc='', tolerance=None):
    m = {'shape': list(t.shape), 'dtype': DTYPES[t.dtype], 'desc': desc}
    if tolerance is not None:
        m['tolerance'] = tolerance
    return m


def write(root, sub, kind, io, meta_extra=None, config=None, sd=None, descs=None, tols=None, first_keys=None):
    """One fixture directory: io.safetensors + meta.json (+ config.json, model.safetensors)."""
    d = os.path.join(root, sub)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    descs, tols = descs or {}, tols or {}
    for k, v in io.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f'{sub}/{k} not finite'
    meta = {'kind': kind}
    for k, v in (first_keys or {}).items():
        meta[k] = v
    meta['tensors'] = {k: tensor_meta(v, descs.get(k, ''), tols.get(k)) for k, v in io.items()}
    for k, v in (meta_extra or {}).items():
        meta[k] = v
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(d, 'io.safetensors'))
    if sd is not None:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, 'model.safetensors'))
    if config is not None:
        json.dump(config, open(os.path.join(d, 'config.json'), 'w'), indent=2)
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'), indent=1, ensure_ascii=False)
    print(f'  wrote {sub}: ' + ', '.join(f'{k}{list(v.shape)}' for k, v in io.items()))


# ----------------------------------------------------------------------------------------- modules

def attention(root, g, name, args, batch, length, ctx_len=None):
    from trellis.modules.attention import MultiHeadAttention
    m = g.init_(MultiHeadAttention(**args)).eval()
    io = {'x': g.randn(batch, length, args['channels'])}
    if args.get('type') == 'cross':
        io['context'] = g.randn(batch, ctx_len, args['ctx_channels'])
        io['out'] = m(io['x'], io['context'])
        conv = 'q = to_q(x).reshape(B,L,H,D); kv = to_kv(ctx).reshape(B,Lc,2,H,D).'
        desc = f'dense cross attention, qk_rms_norm={args.get("qk_rms_norm", False)}'
    else:
        io['out'] = m(io['x'])
        conv = 'qkv = to_qkv(x).reshape(B,L,3,H,D); RMS norm on q,k per head; scale 1/sqrt(D).'
        desc = f'trellis.modules.attention.MultiHeadAttention self, full, qk_rms_norm={args.get("qk_rms_norm", False)}'
    write(root, f'modules/{name}', 'module:MultiHeadAttention', io,
          first_keys={'desc': desc, 'conventions': conv},
          config={'name': 'MultiHeadAttention', 'args': args}, sd=m.state_dict(), tols={'out': FWD})


def cross_block(root, g, name, args, batch, length, ctx_len):
    from trellis.modules.transformer import ModulatedTransformerCrossBlock
    m = g.init_(ModulatedTransformerCrossBlock(**args)).eval()
    C = args['channels']
    cap = {}
    m.norm2.register_forward_pre_hook(lambda mod, inp: cap.__setitem__('after_self_attn', inp[0].clone()))
    m.norm3.register_forward_pre_hook(lambda mod, inp: cap.__setitem__('after_cross_attn', inp[0].clone()))
    if not args.get('share_mod', False):
        m.adaLN_modulation.register_forward_hook(lambda mod, inp, out: cap.__setitem__('adaln', out.clone()))
    io = {'x': g.randn(batch, length, C),
          'mod': g.randn(batch, 6 * C if args.get('share_mod', False) else C),
          'context': g.randn(batch, ctx_len, args['ctx_channels'])}
    out = m(io['x'], io['mod'], io['context'])
    for k in ('adaln', 'after_self_attn', 'after_cross_attn'):
        if k in cap:
            io[k] = cap[k]
    io['out'] = out
    conv = ('adaln = adaLN_modulation(mod) = Linear(SiLU(mod)) split into 6 chunks of C in order shift_msa, scale_msa, '
            'gate_msa, shift_mlp, scale_mlp, gate_mlp (share_mod=True: mod is already [B, 6C]). x1 = x + gate_msa * '
            'self_attn(norm1(x)*(1+scale_msa)+shift_msa); x2 = x1 + cross_attn(norm2(x1), ctx)  (norm2 has affine '
            'weight/bias, norm1/norm3 do not, eps 1e-6); out = x2 + gate_mlp * mlp(norm3(x2)*(1+scale_mlp)+shift_mlp); '
            'mlp = Linear, GELU(tanh), Linear.')
    write(root, f'modules/{name}', 'module:ModulatedTransformerCrossBlock', io,
          first_keys={'desc': 'One ModulatedTransformerCrossBlock (DiT block of SparseStructureFlowModel).',
                      'conventions': conv},
          config={'name': 'ModulatedTransformerCrossBlock', 'args': args}, sd=m.state_dict(), tols={'out': FWD})


def timestep_embedder(root, g, name, hidden, freq, n):
    from trellis.models.sparse_structure_flow import TimestepEmbedder
    m = g.init_(TimestepEmbedder(hidden, freq)).eval()
    t = g.rand(n) * 1000.0
    t[0] = 0.0
    t[-1] = 1000.0
    io = {'t': t, 't_freq': TimestepEmbedder.timestep_embedding(t, freq), 'out': m(t)}
    write(root, f'modules/{name}', 'module:TimestepEmbedder', io,
          first_keys={'desc': 'TimestepEmbedder: t is the raw value the sampler passes (1000 * t in [0,1]).',
                      'conventions': f'half = {freq // 2}; freqs = exp(-ln(10000) * arange(half)/half); args = '
                                     't[:,None]*freqs; t_freq = cat(cos(args), sin(args)) (cos first)'
                                     + ('; odd dim: one zero column appended' if freq % 2 else '')
                                     + '; out = Linear(SiLU(Linear(t_freq))).'},
          config={'name': 'TimestepEmbedder', 'args': {'hidden_size': hidden, 'frequency_embedding_size': freq}},
          sd=m.state_dict(),
          tols={'t_freq': 'abs 1e-5 (large arguments: compute in float32 like torch)', 'out': FWD})


def abs_pos_embedder(root, g, name, specs):
    from trellis.modules.transformer.blocks import AbsolutePositionEmbedder
    io = {}
    for label, channels, in_ch, n, hi in specs:
        pos = g.randint(0, hi, (n, in_ch)).int()
        io[f'{label}_pos'] = pos
        io[f'{label}_out'] = AbsolutePositionEmbedder(channels, in_ch)(pos)
    write(root, f'modules/{name}', 'module:AbsolutePositionEmbedder', io,
          first_keys={'desc': 'AbsolutePositionEmbedder(channels, in_channels=<pos columns>) on integer voxel positions.',
                      'conventions': 'freq_dim = channels // in_channels // 2; freqs = 1/10000^(arange(freq_dim)/freq_dim); '
                                     'for each axis a (sin(p*freqs), cos(p*freqs)) block of 2*freq_dim (sin first); blocks '
                                     'concatenated axis by axis; zero-padded to channels when in_channels*2*freq_dim < channels.'})


def norms(root, g, name, p):
    from trellis.modules.norm import GroupNorm32, ChannelLayerNorm32, LayerNorm32
    from trellis.modules.attention.modules import MultiHeadRMSNorm
    from trellis.modules import sparse as sp
    io = {}
    G, C = p['group']
    gn = g.init_(GroupNorm32(G, C, eps=1e-5))
    io['group_in'] = g.randn(*p['group_shape']) * 2 + 0.5
    io['group_out'] = gn(io['group_in'])
    io['group_weight'], io['group_bias'] = gn.weight.detach().clone(), gn.bias.detach().clone()
    Cl = p['chln']
    ln = g.init_(ChannelLayerNorm32(Cl, elementwise_affine=True, eps=1e-5))
    io['chln_in'] = g.randn(*p['chln_shape']) * 1.5 - 0.3
    io['chln_out'] = ln(io['chln_in'])
    io['chln_weight'], io['chln_bias'] = ln.weight.detach().clone(), ln.bias.detach().clone()
    Cn = p['ln_shape'][-1]
    lna = g.init_(LayerNorm32(Cn, elementwise_affine=True, eps=1e-6))
    io['ln_in'] = g.randn(*p['ln_shape']) * 3 + 1
    io['ln_affine_out'] = lna(io['ln_in'])
    io['ln_affine_weight'], io['ln_affine_bias'] = lna.weight.detach().clone(), lna.bias.detach().clone()
    io['ln_plain_out'] = LayerNorm32(Cn, elementwise_affine=False, eps=1e-6)(io['ln_in'])
    B, L, H, D = p['rms_shape']
    rms = g.init_(MultiHeadRMSNorm(D, H))
    io['rms_in'] = g.randn(B, L, H, D)
    io['rms_out'] = rms(io['rms_in'])
    io['rms_gamma'] = rms.gamma.detach().clone()
    Gs, Cs = p['sparse_gn']
    counts = p['sparse_counts']
    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(p['sparse_res'] ** 3, generator=g.g)[:n]
        r = p['sparse_res']
        xyz = torch.stack([flat // (r * r), (flat // r) % r, flat % r], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    sgn = g.init_(sp.SparseGroupNorm32(Gs, Cs, eps=1e-5))
    feats = g.randn(coords.shape[0], Cs) * 2 - 0.4
    io['sparse_gn_coords'] = coords
    io['sparse_gn_in'] = feats
    io['sparse_gn_out'] = sgn(sp.SparseTensor(feats=feats, coords=coords)).feats
    io['sparse_gn_weight'], io['sparse_gn_bias'] = sgn.weight.detach().clone(), sgn.bias.detach().clone()
    io['f_layer_norm_out'] = F.layer_norm(io['ln_in'], io['ln_in'].shape[-1:])
    write(root, f'modules/{name}', 'module:norms', io, first_keys={
        'desc': 'Normalisation layers',
        'conventions': {
            'group': f'GroupNorm32({G}, {C}) eps 1e-5 over [B,C,X,Y,Z]',
            'chln': f'ChannelLayerNorm32({Cl}): LayerNorm over the channel dim of [B,C,X,Y,Z] (eps 1e-5) - used by the SS VAE (norm_type "layer")',
            'ln_affine': 'LayerNorm32(C, elementwise_affine=True, eps=1e-6)',
            'ln_plain': 'LayerNorm32(C, elementwise_affine=False, eps=1e-6)',
            'f_layer_norm': 'F.layer_norm(x, [C]) default eps 1e-5, no affine (final norm of the flow models / VAEs)',
            'rms': f'MultiHeadRMSNorm(dim={D}, heads={H}) on [B,L,H,D]: normalize(x)*gamma*sqrt(D) (F.normalize eps 1e-12)',
            'sparse_gn': f'SparseGroupNorm32({Gs}, {Cs}): GroupNorm per batch element over all its voxels (stats over voxels x channels-in-group), eps 1e-5',
        }})


def patchify(root, g, name, x_shape, p, shuffle_shape, s):
    from trellis.modules.spatial import patchify as pf, unpatchify as upf, pixel_shuffle_3d
    io = {'x': g.randn(*x_shape)}
    io['patchified'] = pf(io['x'], p)
    io['unpatchified'] = upf(io['patchified'], p)
    io['shuffle_in'] = g.randn(*shuffle_shape)
    io['shuffle_out'] = pixel_shuffle_3d(io['shuffle_in'], s)
    write(root, f'modules/{name}', 'module:patchify', io, first_keys={
        'desc': f'patchify/unpatchify with patch {p}; pixel_shuffle_3d factor {s} (UpsampleBlock3d of the SS decoder uses 2)',
        'conventions': {
            'patchify': 'x [B,C,X,Y,Z] -> reshape [B,C,X/p,p,Y/p,p,Z/p,p] -> permute to [B,C,px,py,pz,X/p,Y/p,Z/p] -> [B, C*p^3, X/p, Y/p, Z/p]; channel index = c*p^3 + px*p^2 + py*p + pz',
            'unpatchify': 'exact inverse',
            'pixel_shuffle_3d': 'x [B, C*s^3, H, W, D] -> reshape [B,C,s,s,s,H,W,D] -> out[b,c,s*h+i,s*w+j,s*d+k] = x[b, c*s^3 + (i*s+j)*s+k, h, w, d]',
        }})


# ------------------------------------------------------------------------------------------ models

def param_stats(sd):
    return {'num_state_dict_entries': len(sd),
            'state_dict_dtypes': sorted({DTYPES[v.dtype] for v in sd.values()}),
            'num_parameters': int(sum(v.numel() for v in sd.values()))}


def occupancy(g, batch, res):
    """Blobby binary occupancy [B,1,R,R,R]: union of random balls."""
    ax = torch.arange(res).float()
    X, Y, Z = torch.meshgrid(ax, ax, ax, indexing='ij')
    out = torch.zeros(batch, 1, res, res, res)
    for b in range(batch):
        occ = torch.zeros(res, res, res, dtype=torch.bool)
        for _ in range(3 + b):
            c = g.rand(3) * res
            r = res * (0.12 + 0.2 * float(g.rand(1)))
            occ |= (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 < r * r
        out[b, 0] = occ.float()
    return out


def block_entries(m, prefix):
    """The SS VAE's `blocks` and `middle_block` entries in forward order (README: encoder `blocks` then
    `middle_block`, decoder `middle_block` then `blocks`), with the name each one's output is recorded under."""
    from trellis.models import SparseStructureEncoder
    parts = ('blocks', 'middle_block') if isinstance(m, SparseStructureEncoder) else ('middle_block', 'blocks')
    entries = [(part, i, e) for part in parts for i, e in enumerate(getattr(m, part))]
    return [(f'{prefix}{k}', f'{part}[{i}] ({type(e).__name__})', e) for k, (part, i, e) in enumerate(entries)]


def traced(m, prefix, fn, suffix=''):
    """Runs fn() with forward hooks on every block entry of m; returns fn's result, the recorded outputs
    {prefix<k><suffix>: float32 tensor} and their descriptions."""
    outs, descs, hooks = {}, {}, []
    for name, what, e in block_entries(m, prefix):
        def hook(_mod, _inp, out, name=name + suffix):
            assert name not in outs, f'{name} ran twice'
            outs[name] = out.detach().float().clone()
        hooks.append(e.register_forward_hook(hook))
        descs[name + suffix] = f'output of {what}, entry {name[len(prefix):]} in forward order, cast to float32'
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == len(descs), 'every block entry must run once'
    return result, outs, descs


def ss_encoder(root, g, name, args, batch, res, blocks=False):
    from trellis.models import SparseStructureEncoder
    m = g.init_(SparseStructureEncoder(**args)).eval()
    x = occupancy(g, batch, res)
    (z, mean, logvar), inter, idescs = traced(m, 'enc_block', lambda: m(x, sample_posterior=False, return_raw=True))
    if not blocks:
        inter, idescs = {}, {}
    sd = m.state_dict()
    write(root, f'models/{name}', 'model:SparseStructureEncoder',
          {'x_occupancy': x, 'z': z, 'mean': mean, 'logvar': logvar, **inter},
          first_keys={'desc': 'SparseStructureEncoder on binary occupancy grids; sample_posterior=False so z = mean.',
                      'conventions': 'x [B,1,X,Y,Z] float occupancy (1 = occupied). out_layer -> [B, 2*latent, ...] split into mean (first half), logvar.'
                      + (' enc_block<k>: output of the k-th entry of blocks then middle_block.' if blocks else '')},
          meta_extra=param_stats(sd), config={'name': 'SparseStructureEncoder', 'args': args}, sd=sd,
          descs={'x_occupancy': 'input occupancy [B,1,R,R,R]', 'z': 'latent (= mean)', 'mean': 'posterior mean',
                 'logvar': 'posterior log variance', **idescs}, tols={'z': FWD, **{k: FWD for k in inter}})


def ss_decoder(root, g, name, args, batch, res, frac=0.3, blocks=False):
    from trellis.models import SparseStructureDecoder
    m = g.init_(SparseStructureDecoder(**args)).eval()
    z = g.randn(batch, args['latent_channels'], res, res, res)
    logits = m(z)
    # shift the last conv bias so that about `frac` of the voxels are occupied (a parameter like any other)
    with torch.no_grad():
        q = torch.quantile(logits.flatten()[:2_000_000], 1 - frac)
        m.out_layer[-1].bias -= q
    logits, inter, idescs = traced(m, 'dec_block', lambda: m(z))
    if not blocks:
        inter, idescs = {}, {}
    coords = torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()
    sd = m.state_dict()
    write(root, f'models/{name}', 'model:SparseStructureDecoder', {'z': z, 'logits': logits, 'coords': coords, **inter},
          first_keys={'desc': 'SparseStructureDecoder: latent [B,C,r,r,r] -> occupancy logits [B,1,4r,4r,4r]; coords = argwhere(logits>0)[:, [0,2,3,4]] as in sample_sparse_structure.',
                      'positive_fraction': float((logits > 0).float().mean()),
                      'conventions': 'UpsampleBlock3d = conv3d(C, 8*C_out, 3, pad 1) then pixel_shuffle_3d(2). coords are in torch.argwhere order = lexicographic (b,x,y,z).'
                      + (' dec_block<k>: output of the k-th entry of middle_block then blocks.' if blocks else '')},
          meta_extra=param_stats(sd), config={'name': 'SparseStructureDecoder', 'args': args}, sd=sd,
          descs={'z': 'input latent', 'logits': 'decoder output', 'coords': 'int32 [N,4] occupied voxels', **idescs},
          tols={'logits': 'rel_l2 1e-5; coords: exact except voxels whose |logit| < 1e-4', **{k: FWD for k in inter}})


def fp16_pair(cls, args, m32):
    """The original's use_fp16 model loaded with m32's weights, its state_dict, and a float32 twin of those weights."""
    m16 = cls(**dict(args, use_fp16=True)).eval()
    m16.load_state_dict(m32.state_dict())
    sd16 = m16.state_dict()
    twin = cls(**dict(args, use_fp16=False)).eval()
    twin.load_state_dict({k: v.float() for k, v in sd16.items()})
    return m16, sd16, twin


FP16_CONV = ('use_fp16=True: the Conv3d weights of blocks / middle_block are float16 (the original convert_to_fp16), '
             'input/out layers and norms float32; activations are cast to float16 for the torso and back before out_layer '
             '(norms compute in float32 and cast back). <name>_mixed_fp16 was computed on CPU in that mixed precision; '
             '<name>_fp32_same_weights = the same (float16-rounded) weights run fully in float32.')


def fp16_meta(sd16, mixed, full):
    return {'fp16_tensors': sorted(k for k, v in sd16.items() if v.dtype == torch.float16),
            'fp32_tensors': sorted(k for k, v in sd16.items() if v.dtype == torch.float32),
            'observed_rel_l2_mixed_vs_fp32': rel(mixed, full)}


def ss_encoder_fp16(root, g, name, args, batch, res):
    from trellis.models import SparseStructureEncoder
    m = g.init_(SparseStructureEncoder(**dict(args, use_fp16=False))).eval()
    m16, sd16, twin = fp16_pair(SparseStructureEncoder, args, m)
    x = occupancy(g, batch, res)
    _, mean16, logvar16 = m16(x, sample_posterior=False, return_raw=True)
    _, mean, logvar = twin(x, sample_posterior=False, return_raw=True)
    io = {'x_occupancy': x, 'mean_mixed_fp16': mean16.float(), 'logvar_mixed_fp16': logvar16.float(),
          'mean_fp32_same_weights': mean, 'logvar_fp32_same_weights': logvar}
    write(root, f'models/{name}', 'model:SparseStructureEncoder', io,
          first_keys={'desc': 'SparseStructureEncoder with use_fp16=True; sample_posterior=False so z = mean.',
                      'conventions': FP16_CONV, **fp16_meta(sd16, mean16.float(), mean)},
          meta_extra=param_stats(sd16), config={'name': 'SparseStructureEncoder', 'args': args}, sd=sd16,
          tols={'mean_mixed_fp16': 'rel_l2 ~1e-2 (float16 activations)',
                'logvar_mixed_fp16': 'rel_l2 ~1e-2 (float16 activations)',
                'mean_fp32_same_weights': FWD, 'logvar_fp32_same_weights': FWD})


def ss_decoder_fp16(root, g, name, args, batch, res, blocks=False):
    from trellis.models import SparseStructureDecoder
    m = g.init_(SparseStructureDecoder(**dict(args, use_fp16=False))).eval()
    m16, sd16, twin = fp16_pair(SparseStructureDecoder, args, m)
    z = g.randn(batch, args['latent_channels'], res, res, res)
    mixed, inter16, d16 = traced(m16, 'dec_block', lambda: m16(z).float(), '_mixed_fp16')
    full, inter32, d32 = traced(twin, 'dec_block', lambda: twin(z), '_fp32_same_weights')
    inter, idescs = ({**inter16, **inter32}, {**d16, **d32}) if blocks else ({}, {})
    tols = {k: ('rel_l2 ~1e-2 (float16 activations)' if k.endswith('_mixed_fp16') else FWD) for k in inter}
    write(root, f'models/{name}', 'model:SparseStructureDecoder',
          {'z': z, 'logits_mixed_fp16': mixed, 'logits_fp32_same_weights': full, **inter},
          first_keys={'desc': 'SparseStructureDecoder with use_fp16=True: latent [B,C,r,r,r] -> occupancy logits.',
                      'conventions': FP16_CONV, **fp16_meta(sd16, mixed, full)},
          meta_extra=param_stats(sd16), config={'name': 'SparseStructureDecoder', 'args': args}, sd=sd16, descs=idescs,
          tols={'logits_mixed_fp16': 'rel_l2 ~1e-2 (float16 activations)', 'logits_fp32_same_weights': FWD, **tols})


def ss_flow(root, g, name, args, batch, cond_len):
    from trellis.models import SparseStructureFlowModel
    a32 = dict(args, use_fp16=False)
    m = g.init_(SparseStructureFlowModel(**a32)).eval()
    R, Cin = args['resolution'], args['in_channels']
    x = g.randn(batch, Cin, R, R, R)
    t = g.rand(batch) * 1000.0
    cond = g.randn(batch, cond_len, args['cond_channels'])
    conv = ('t is passed as 1000*t (what FlowEulerSampler._inference_model does).  Tokens: patchify(x, p) -> '
            '[B, C*p^3, R/p,R/p,R/p] -> flatten spatial (x-major, z fastest) -> [B, L, C*p^3]. pos_emb buffer = '
            'AbsolutePositionEmbedder(model_channels) of the (R/p)^3 grid coords in the same order (stored in the '
            'state_dict). Final: F.layer_norm (eps 1e-5, no affine) -> out_layer -> unpatchify.')
    if not args.get('use_fp16', False):
        cap = {}
        m.input_layer.register_forward_hook(lambda mod, i, o: cap.__setitem__('input_layer_out', o.clone()))
        m.t_embedder.register_forward_hook(lambda mod, i, o: cap.__setitem__('t_emb', o.clone()))
        for i, b in enumerate(m.blocks):
            b.register_forward_hook(lambda mod, inp, o, i=i: cap.__setitem__(f'block{i}', o.float().clone()))
        out = m(x, t, cond)
        io = {'x': x, 't': t, 'cond': cond, 'out': out, 'input_layer_out': cap['input_layer_out'], 't_emb': cap['t_emb']}
        io.update({f'block{i}': cap[f'block{i}'] for i in range(len(m.blocks))})
        sd = m.state_dict()
        descs = {'x': 'noisy latent [B,C,R,R,R]', 't': '1000*t per batch element',
                 'cond': 'condition tokens [B,L,cond_channels]', 'out': 'predicted velocity',
                 'input_layer_out': 'input_layer(tokens) before +pos_emb',
                 't_emb': 't_embedder output [B,model_channels]'}
        descs.update({f'block{i}': f'output of blocks[{i}] [B,L,model_channels]' for i in range(len(m.blocks))})
        write(root, f'models/{name}', 'model:SparseStructureFlowModel', io,
              first_keys={'desc': 'SparseStructureFlowModel forward (velocity prediction).', 'conventions': conv},
              meta_extra=param_stats(sd), config={'name': 'SparseStructureFlowModel', 'args': args}, sd=sd,
              descs=descs, tols={'out': FWD})
        return
    # use_fp16: what the original's conversion leaves in the state_dict, run in mixed precision
    m16 = SparseStructureFlowModel(**args).eval()
    m16.load_state_dict(m.state_dict())
    sd16 = m16.state_dict()
    mixed = m16(x, t, cond).float()
    m32 = SparseStructureFlowModel(**a32).eval()
    m32.load_state_dict({k: v.float() for k, v in sd16.items()})
    full = m32(x, t, cond)
    write(root, f'models/{name}', 'model:SparseStructureFlowModel',
          {'x': x, 't': t, 'cond': cond, 'out_mixed_fp16': mixed, 'out_fp32_same_weights': full},
          first_keys={
              'desc': 'SparseStructureFlowModel with use_fp16=True (random weights rounded to float16 where the original converts).',
              'fp16_tensors': sorted(k for k, v in sd16.items() if v.dtype == torch.float16),
              'fp32_tensors': sorted(k for k, v in sd16.items() if v.dtype == torch.float32),
              'conventions': conv.split('  Tokens')[0] + ' use_fp16=True: blocks Linear weights are float16, everything else '
                             'float32; activations are cast to float16 inside the torso and back to float32 before the final '
                             'layer_norm/out_layer. out_mixed_fp16 was computed on CPU in that mixed precision; attention inside '
                             'the shim is computed in float32 and cast back to float16 like flash-attn output. '
                             'out_fp32_same_weights = the same (float16-rounded) weights run fully in float32.',
              'observed_rel_l2_mixed_vs_fp32': rel(mixed, full)},
          meta_extra=param_stats(sd16), config={'name': 'SparseStructureFlowModel', 'args': args}, sd=sd16,
          tols={'out_mixed_fp16': 'rel_l2 ~1e-2 (float16 activations)', 'out_fp32_same_weights': FWD})


# ------------------------------------------------------------------------------------------- sets

def set1(root, g):
    attention(root, g, 'dn_attn_self_b3', {'channels': 96, 'num_heads': 3, 'type': 'self', 'qk_rms_norm': True}, 3, 19)
    attention(root, g, 'dn_attn_self_plain_b1', {'channels': 48, 'num_heads': 2, 'type': 'self', 'qk_rms_norm': False}, 1, 33)
    attention(root, g, 'dn_attn_cross_b3', {'channels': 48, 'num_heads': 2, 'ctx_channels': 40, 'type': 'cross',
                                            'qk_rms_norm': False}, 3, 13, 77)
    attention(root, g, 'dn_attn_cross_qkrms_b1', {'channels': 128, 'num_heads': 8, 'ctx_channels': 24, 'type': 'cross',
                                                  'qk_rms_norm': True}, 1, 21, 5)
    cross_block(root, g, 'dn_cross_block_b3', {'channels': 96, 'ctx_channels': 40, 'num_heads': 3, 'mlp_ratio': 2,
                                               'attn_mode': 'full', 'qk_rms_norm': True, 'qk_rms_norm_cross': True,
                                               'share_mod': False}, 3, 16, 9)
    cross_block(root, g, 'dn_cross_block_mlp2p5_b1', {'channels': 36, 'ctx_channels': 12, 'num_heads': 2,
                                                      'mlp_ratio': 2.5, 'attn_mode': 'full', 'qkv_bias': False,
                                                      'qk_rms_norm': True, 'qk_rms_norm_cross': True,
                                                      'share_mod': False}, 1, 7, 4)
    timestep_embedder(root, g, 'dn_timestep_embedder', 96, 256, 7)
    abs_pos_embedder(root, g, 'dn_abs_pos', [('ape96', 96, 3, 17, 16), ('ape1024', 1024, 3, 9, 64),
                                             ('ape70', 70, 3, 11, 32), ('ape40', 40, 2, 6, 20)])
    norms(root, g, 'dn_norms', {'group': (16, 64), 'group_shape': (3, 64, 3, 4, 5), 'chln': 48,
                                'chln_shape': (1, 48, 6, 2, 3), 'ln_shape': (2, 11, 96), 'rms_shape': (3, 5, 3, 32),
                                'sparse_gn': (4, 16), 'sparse_counts': (40, 7, 25), 'sparse_res': 8})
    patchify(root, g, 'dn_patchify', (3, 2, 8, 4, 12), 4, (1, 40, 2, 3, 4), 2)
    ss_encoder(root, g, 'dn_ss_encoder_b3', {'in_channels': 1, 'latent_channels': 4, 'num_res_blocks': 1,
                                              'channels': [8, 16, 24], 'num_res_blocks_middle': 1, 'use_fp16': False}, 3, 16)
    ss_decoder(root, g, 'dn_ss_decoder_b1', {'out_channels': 1, 'latent_channels': 4, 'num_res_blocks': 1,
                                              'channels': [24, 16, 8], 'num_res_blocks_middle': 3, 'use_fp16': False}, 1, 6)
    ss_encoder_fp16(root, g, 'dn_ss_encoder_fp16_b1', {'in_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                                        'channels': [8, 16, 32], 'num_res_blocks_middle': 2,
                                                        'use_fp16': True}, 1, 16)
    flow = {'resolution': 8, 'in_channels': 4, 'out_channels': 4, 'model_channels': 96, 'cond_channels': 40,
            'num_blocks': 3, 'num_heads': 3, 'mlp_ratio': 4, 'patch_size': 2, 'pe_mode': 'ape', 'qk_rms_norm': True,
            'qk_rms_norm_cross': True, 'use_fp16': False}
    ss_flow(root, g, 'dn_ss_flow_p2_b3', flow, 3, 7)
    ss_flow(root, g, 'dn_ss_flow_p2_b3_sharemod_fp16', dict(flow, share_mod=True, use_fp16=True), 3, 7)
    attention(root, g, 'dn_attn_self_long_b3', {'channels': 32, 'num_heads': 4, 'type': 'self', 'qk_rms_norm': True},
              3, 1200)   # 3*4*1200^2 scores: over the Rust side's per-chunk budget
    ss_flow(root, g, 'dn_ss_flow_r12_p3_io', {'resolution': 12, 'in_channels': 3, 'out_channels': 5,
                                               'model_channels': 48, 'cond_channels': 16, 'num_blocks': 1,
                                               'num_heads': 4, 'mlp_ratio': 4, 'patch_size': 3, 'pe_mode': 'ape',
                                               'qk_rms_norm': False, 'use_fp16': False}, 2, 3)


def set2(root, g):
    attention(root, g, 'dn_attn_self_b1', {'channels': 64, 'num_heads': 1, 'type': 'self', 'qk_rms_norm': True}, 1, 64)
    attention(root, g, 'dn_attn_self_nobias_b3', {'channels': 72, 'num_heads': 6, 'type': 'self', 'qkv_bias': False,
                                                  'qk_rms_norm': False}, 3, 8)
    attention(root, g, 'dn_attn_cross_b1', {'channels': 32, 'num_heads': 4, 'ctx_channels': 32, 'type': 'cross',
                                            'qk_rms_norm': False}, 1, 30, 1)
    attention(root, g, 'dn_attn_cross_qkrms_b3', {'channels': 80, 'num_heads': 5, 'ctx_channels': 56, 'type': 'cross',
                                                  'qk_rms_norm': True}, 3, 12, 31)
    cross_block(root, g, 'dn_cross_block_b1', {'channels': 64, 'ctx_channels': 24, 'num_heads': 2, 'mlp_ratio': 3,
                                               'attn_mode': 'full', 'qk_rms_norm': False, 'qk_rms_norm_cross': False,
                                               'share_mod': False}, 1, 40, 3)
    cross_block(root, g, 'dn_cross_block_sharemod_b3', {'channels': 48, 'ctx_channels': 48, 'num_heads': 4,
                                                        'mlp_ratio': 4, 'attn_mode': 'full', 'qk_rms_norm': True,
                                                        'qk_rms_norm_cross': False, 'share_mod': True}, 3, 10, 6)
    timestep_embedder(root, g, 'dn_timestep_embedder_odd', 40, 129, 4)
    abs_pos_embedder(root, g, 'dn_abs_pos', [('ape64', 64, 3, 30, 64), ('ape1280', 1280, 3, 5, 16),
                                             ('ape33', 33, 3, 8, 8), ('ape128', 128, 3, 12, 128)])
    norms(root, g, 'dn_norms', {'group': (32, 32), 'group_shape': (1, 32, 5, 5, 2), 'chln': 16,
                                'chln_shape': (3, 16, 2, 3, 4), 'ln_shape': (1, 5, 1280), 'rms_shape': (1, 13, 16, 8),
                                'sparse_gn': (32, 64), 'sparse_counts': (90,), 'sparse_res': 16})
    patchify(root, g, 'dn_patchify', (1, 5, 6, 6, 6), 3, (3, 54, 2, 2, 3), 3)
    ss_encoder(root, g, 'dn_ss_encoder_group_b1', {'in_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                                    'channels': [32, 32, 64], 'num_res_blocks_middle': 2,
                                                    'norm_type': 'group', 'use_fp16': False}, 1, 16)
    ss_decoder(root, g, 'dn_ss_decoder_b3', {'out_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                              'channels': [32, 16, 8], 'num_res_blocks_middle': 1, 'use_fp16': False}, 3, 4)
    ss_decoder(root, g, 'dn_ss_decoder_group_b1', {'out_channels': 1, 'latent_channels': 3, 'num_res_blocks': 1,
                                                    'channels': [64, 32], 'num_res_blocks_middle': 1,
                                                    'norm_type': 'group', 'use_fp16': False}, 1, 5)
    ss_decoder_fp16(root, g, 'dn_ss_decoder_fp16_b3', {'out_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                                        'channels': [32, 16, 8], 'num_res_blocks_middle': 2,
                                                        'use_fp16': True}, 3, 4)
    flow = {'resolution': 16, 'in_channels': 8, 'out_channels': 8, 'model_channels': 64, 'cond_channels': 24,
            'num_blocks': 2, 'num_head_channels': 32, 'mlp_ratio': 4, 'patch_size': 1, 'pe_mode': 'ape',
            'share_mod': True, 'qk_rms_norm': True, 'use_fp16': False}
    ss_flow(root, g, 'dn_ss_flow_r16_b1', flow, 1, 5)
    flow = {'resolution': 16, 'in_channels': 8, 'out_channels': 8, 'model_channels': 48, 'cond_channels': 32,
            'num_blocks': 2, 'num_heads': 2, 'mlp_ratio': 4, 'patch_size': 1, 'pe_mode': 'ape', 'qk_rms_norm': True,
            'qk_rms_norm_cross': True, 'use_fp16': True}
    ss_flow(root, g, 'dn_ss_flow_b3_fp16', flow, 3, 11)


def set3(root, g):
    """SS VAE fixtures carrying the optional intermediates enc_block<k> / dec_block<k> (reference README)."""
    ss_encoder(root, g, 'dn_ss_encoder_blocks_b2', {'in_channels': 1, 'latent_channels': 4, 'num_res_blocks': 1,
                                                     'channels': [8, 16], 'num_res_blocks_middle': 2,
                                                     'use_fp16': False}, 2, 8, blocks=True)
    ss_decoder(root, g, 'dn_ss_decoder_blocks_b1', {'out_channels': 1, 'latent_channels': 4, 'num_res_blocks': 1,
                                                     'channels': [16, 8], 'num_res_blocks_middle': 2,
                                                     'use_fp16': False}, 1, 4, blocks=True)
    ss_encoder(root, g, 'dn_ss_encoder_blocks_group_b1', {'in_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                                           'channels': [32, 32, 64], 'num_res_blocks_middle': 2,
                                                           'norm_type': 'group', 'use_fp16': False}, 1, 16, blocks=True)
    ss_decoder(root, g, 'dn_ss_decoder_blocks_b3', {'out_channels': 1, 'latent_channels': 8, 'num_res_blocks': 2,
                                                     'channels': [32, 16, 8], 'num_res_blocks_middle': 1,
                                                     'use_fp16': False}, 3, 4, blocks=True)
    ss_decoder_fp16(root, g, 'dn_ss_decoder_blocks_fp16_b1', {'out_channels': 1, 'latent_channels': 8,
                                                               'num_res_blocks': 2, 'channels': [32, 16, 8],
                                                               'num_res_blocks_middle': 2, 'use_fp16': True},
                    1, 4, blocks=True)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out')
    ap.add_argument('seed', type=int)
    ap.add_argument('--set', type=int, default=1, choices=[1, 2, 3])
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    print(f'gen_dense: set {a.set}, seed {a.seed} -> {a.out} (torch threads {torch.get_num_threads()})')
    {1: set1, 2: set2, 3: set3}[a.set](a.out, Gen(a.seed))
