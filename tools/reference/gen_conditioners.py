"""Alternate fixtures for the conditioner kinds, recorded with the ORIGINAL TRELLIS pipeline code (see README.md here).

    OMP_NUM_THREADS=1 python gen_conditioners.py OUT_ROOT SEED [--set 1|2] [--tokenizer DIR]

Writes, under OUT_ROOT, in the format of shared/reference:

  preprocess/pp_alt           preprocess:image: TrellisImageTo3DPipeline.preprocess_image (the original method) on
                              synthetic RGBA images WITH alpha (sizes, aspect ratios, alpha shapes vary per set:
                              soft/hard edges, partial alpha around the 0.8*255 threshold, objects touching the border).
  conditioners/dino_alt       conditioner:dinov2_with_registers: a tiny random transformers Dinov2WithRegistersModel
                              (HF format) behind a torch.hub-style adapter (x_prenorm = hidden_states[-1]), run through
                              the original TrellisImageTo3DPipeline.encode_image on the preprocessed images above.
  conditioners/clip_alt       conditioner:clip_text: a tiny random transformers CLIPTextModel + the CLIP BPE tokenizer
                              files of the visible fixture (--tokenizer, default the visible clip_text_tiny), run through
                              the original TrellisTextTo3DPipeline.encode_text (prompts include one over 77 tokens).

Needs transformers 5.24.0 / tokenizers 0.23.3 (the versions the fixture README names) in the venv. SEED drives every
random number; `--set` picks one of two size tables (hidden sizes, heads, layers, registers, patch size / trained
image size, SwiGLU FFN, activation, prompt lists, image sizes). Weights: linear/conv weights N(0, 1/fan_in), biases
N(0, 0.05^2), LayerNorm weights 1 + N(0, s^2) (s in [0.1, 0.3]), DINOv2 cls/mask/register tokens and position table
N(0, 0.1^2), LayerScale U(0.2, 0.8), CLIP token/position embeddings N(0, 0.5^2) (as the visible fixtures look).
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import json
import math
import os
import shutil
import sys
import types

import transformers  # the real package: import it before common.py, which stubs absent packages
from transformers import (CLIPTextConfig, CLIPTextModel, AutoTokenizer, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *  # noqa: E402,F401
from safetensors.torch import save_file  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
import PIL  # noqa: E402

from gen_dense import tensor_meta  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def init_hf(model, g, emb_std):
    """README initialisation for a transformers model (see the module doc)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        with torch.no_grad():
            if 'lambda1' in name:
                p.copy_(0.2 + 0.6 * torch.rand(p.shape, generator=g))
            elif any(s in name for s in ('cls_token', 'mask_token', 'register_tokens', 'position_embeddings')):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif 'embedding' in name and p.dim() == 2 and 'patch' not in name:
                p.copy_(torch.randn(p.shape, generator=g) * emb_std)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif leaf == 'bias':
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                s = 0.1 + 0.2 * float(torch.rand(1, generator=g))
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * s)


def write_fixture(d, kind, io, meta_head, meta_tail=None):
    os.makedirs(d, exist_ok=True)
    meta = {'kind': kind}
    meta.update(meta_head)
    meta['tensors'] = {k: tensor_meta(v) for k, v in io.items()}
    meta.update(meta_tail or {})
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(d, 'io.safetensors'))
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'), indent=1, ensure_ascii=False)
    print(f'  wrote {d}: ' + ', '.join(f'{k}{list(v.shape)}' for k, v in io.items()))


# ------------------------------------------------------------------------------------- preprocess

def synthetic_rgba(g, h, w, shape, rng):
    """An RGBA image with smooth colour + noise and an alpha matte of the given shape."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([
        128 + 100 * np.sin(xx / (7 + 13 * rng.random()) + rng.random() * 6),
        128 + 100 * np.cos(yy / (5 + 11 * rng.random()) + rng.random() * 6),
        255 * (xx + yy) / (w + h),
    ], -1) + rng.normal(0, 20, (h, w, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    a = Image.new('L', (w, h), 0)
    dr = ImageDraw.Draw(a)
    kind = shape['kind']
    if kind == 'ellipse':
        x0, y0, x1, y1 = shape['box']
        dr.ellipse((x0 * w, y0 * h, x1 * w, y1 * h), fill=255)
    elif kind == 'rect':
        x0, y0, x1, y1 = shape['box']
        dr.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=255)
    elif kind == 'polygon':
        dr.polygon([(x * w, y * h) for x, y in shape['points']], fill=255)
    elif kind == 'blobs':
        for _ in range(shape['n']):
            cx, cy = rng.random() * w, rng.random() * h
            r = (0.05 + 0.15 * rng.random()) * min(w, h)
            dr.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(150 + 105 * rng.random()))
    elif kind == 'threshold':   # alpha values 203..206 around the strict > 0.8*255 = 204 test
        dr.rectangle((0, 0, w, h), fill=204)
        dr.rectangle((w // 4, h // 3, w // 2, h // 2), fill=205)
        dr.rectangle((w // 2, h // 5, w - 3, h // 4), fill=206)
        dr.rectangle((2, h - 10, w // 3, h - 2), fill=203)
    elif kind == 'nearly_opaque':   # alpha 255 except one pixel: the crop box leaves the image on every side
        dr.rectangle((0, 0, w, h), fill=255)
        dr.point((w - 1, 0), fill=0)
    if shape.get('blur'):
        a = a.filter(ImageFilter.GaussianBlur(shape['blur']))
    alpha = np.array(a).astype(np.float32)
    if shape.get('scale'):   # partial alpha: some pixels straddle the 0.8*255 threshold
        alpha = alpha * shape['scale']
    if shape.get('ramp'):    # alpha falling off left to right
        alpha = alpha * (1.0 - 0.5 * xx / w)
    alpha = np.clip(np.round(alpha), 0, 255).astype(np.uint8)
    assert (alpha > 0.8 * 255).any() and not (alpha == 255).all()
    return np.concatenate([rgb, alpha[..., None]], -1)


def preprocess(root, rng, specs):
    from trellis.pipelines.trellis_image_to_3d import TrellisImageTo3DPipeline
    io, outs = {}, []
    for i, (h, w, shape) in enumerate(specs):
        rgba = synthetic_rgba(None, h, w, shape, rng)
        out = TrellisImageTo3DPipeline.preprocess_image(types.SimpleNamespace(), Image.fromarray(rgba, 'RGBA'))
        io[f'rgba_in_{i}'] = torch.from_numpy(rgba)
        io[f'rgb518_{i}'] = torch.from_numpy(np.array(out))
        outs.append(out)
    d = os.path.join(root, 'preprocess', 'pp_alt')
    shutil.rmtree(d, ignore_errors=True)
    write_fixture(d, 'preprocess:image', io, {
        'desc': 'TrellisImageTo3DPipeline.preprocess_image (alpha path: input RGBA with non-255 alpha) on synthetic images.',
        'algorithm': 'alpha = A channel; bbox = argwhere(alpha > 0.8*255) -> (xmin, ymin, xmax, ymax); center = ((xmin+xmax)/2, '
                     '(ymin+ymax)/2) (float); size = int(max(xmax-xmin, ymax-ymin) * 1.2); crop box = (cx - size//2, cy - '
                     'size//2, cx + size//2, cy + size//2) (PIL crop with float box -> PIL rounds; outside pixels = 0); resize '
                     'to 518x518 with PIL LANCZOS on the RGBA image; rgb = uint8((rgb/255 * alpha/255) * 255) (truncation, '
                     'premultiplied); then encode_image: resize(518, LANCZOS) no-op, convert("RGB"), /255, '
                     'Normalize(mean=[0.485,0.456,0.406], std=[0.229,0.224,0.225]).',
        'pil_version': PIL.__version__,
        'shapes': [f'{h}x{w} {s}' for h, w, s in specs],
        'normalized_tensor': 'the float32 [3,518,518] tensor fed to the image encoder for image 0 is '
                             'conditioners/dino_alt/io.safetensors image_normalized_0 (size budget); for the others it is '
                             'Normalize(rgb518_i / 255)',
        'tolerance': 'uint8 outputs: exact with a faithful PIL LANCZOS port (allow +-1 if your resampler differs); '
                     'normalized: abs 1e-6 given the uint8 image',
    })
    return outs


# ---------------------------------------------------------------------------------------- dinov2

class HubAdapter(torch.nn.Module):
    """torch.hub dinov2's forward(x, is_training=True)['x_prenorm'] on a transformers model."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x, is_training=False):
        return {'x_prenorm': self.hf(pixel_values=x, output_hidden_states=True).hidden_states[-1]}


def dinov2(root, g, images, cfg_kw):
    from trellis.pipelines.trellis_image_to_3d import TrellisImageTo3DPipeline
    from torchvision import transforms
    cfg = Dinov2WithRegistersConfig(**cfg_kw)
    model = Dinov2WithRegistersModel(cfg).eval()
    init_hf(model, g, 0.1)
    d = os.path.join(root, 'conditioners', 'dino_alt')
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    stub = types.SimpleNamespace(
        models={'image_cond_model': HubAdapter(model)}, device=torch.device('cpu'),
        image_cond_model_transform=transforms.Compose([
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]))
    cond = TrellisImageTo3DPipeline.encode_image(stub, images)
    # the same normalised batch encode_image builds, for image 0 and the prenorm tokens
    arr = [np.array(i.resize((518, 518), Image.LANCZOS).convert('RGB')).astype(np.float32) / 255 for i in images]
    x = stub.image_cond_model_transform(torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() for a in arr]))
    prenorm = HubAdapter(model)(x)['x_prenorm']
    assert torch.equal(F.layer_norm(prenorm, prenorm.shape[-1:]), cond)
    grid = 518 // cfg.patch_size
    trained = cfg.image_size // cfg.patch_size
    write_fixture(d, 'conditioner:dinov2_with_registers',
                  {'image_normalized_0': x[0], 'cond': cond, 'x_prenorm': prenorm}, {
        'desc': 'Tiny Dinov2WithRegistersModel (transformers, random weights, HF format in this folder: config.json + '
                'model.safetensors) and the TRELLIS image conditioning computed by the ORIGINAL '
                'TrellisImageTo3DPipeline.encode_image with the HF model behind a torch.hub-style adapter (x_prenorm = '
                'hidden_states[-1]).',
        'input': 'image_normalized_0 = the normalised [3,518,518] tensor of preprocessing image 0 (see '
                 '../../preprocess/pp_alt); cond for all preprocessing images',
        'cond': f'F.layer_norm(x_prenorm, [C]) (no affine, eps 1e-5): [B, 1 + {cfg.num_register_tokens} + {grid}*{grid} = '
                f'{1 + cfg.num_register_tokens + grid * grid}, C]; token order CLS, {cfg.num_register_tokens} registers, '
                f'{grid}x{grid} patches row-major (y then x)',
        'position_table': (f'trained grid {trained}x{trained} (image_size {cfg.image_size}, patch {cfg.patch_size}) '
                           + ('= the input grid: table used unchanged' if trained == grid else
                              f'!= the {grid}x{grid} input grid: transformers interpolate_pos_encoding (bicubic, '
                              'align_corners=False, antialias=True, float32) of the patch part; the torch.hub model '
                              'interpolates differently, but TRELLIS only runs the 518/14 model, where no interpolation '
                              'happens')),
        'ffn': 'SwiGLU (transformers Dinov2WithRegistersSwiGLUFFN)' if cfg.use_swiglu_ffn else 'MLP (fc1, GELU, fc2)',
        'tolerance': 'rel_l2 1e-5',
    })


def dinov2_direct(root, g, name, cfg_kw, batch, h, w):
    """The same HF model run on normalised tensors given directly (any size: the position table is interpolated
    when the patch grid differs from the trained one), cond = F.layer_norm(x_prenorm) as encode_image computes it."""
    cfg = Dinov2WithRegistersConfig(**cfg_kw)
    model = Dinov2WithRegistersModel(cfg).eval()
    init_hf(model, g, 0.1)
    d = os.path.join(root, 'conditioners', name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing='ij')
    imgs = []
    for b in range(batch):
        ph = torch.rand(3, 1, 1, generator=g) * 6
        rgb = 0.5 + 0.4 * torch.sin(ph + (3 + b) * xx[None] + (2 + 2 * b) * yy[None] * ph)
        rgb = (rgb + 0.05 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        imgs.append((rgb - mean) / std)
    x = torch.stack(imgs)
    prenorm = HubAdapter(model)(x)['x_prenorm']
    cond = F.layer_norm(prenorm, prenorm.shape[-1:])
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    trained = cfg.image_size // cfg.patch_size
    io = {f'image_normalized_{b}': x[b] for b in range(batch)}
    io.update({'cond': cond, 'x_prenorm': prenorm})
    write_fixture(d, 'conditioner:dinov2_with_registers', io, {
        'desc': 'Tiny Dinov2WithRegistersModel (transformers, random weights, HF format in this folder) run directly on '
                'the normalised image tensors image_normalized_<i> (not 518x518: no TRELLIS preprocessing involved); '
                'x_prenorm = hidden_states[-1], cond = F.layer_norm(x_prenorm) as TrellisImageTo3DPipeline.encode_image.',
        'input': f'image_normalized_<i> [3,{h},{w}] for every batch entry',
        'cond': f'[B, 1 + {cfg.num_register_tokens} + {gh}*{gw}, C]; token order CLS, registers, {gh}x{gw} patches '
                'row-major (y then x)',
        'position_table': f'trained grid {trained}x{trained}; input grid {gh}x{gw}: transformers interpolate_pos_encoding '
                          '(bicubic, align_corners=False, antialias=True, float32) of the patch part'
                          + ('' if (gh, gw) != (trained, trained) else ' (not applied: same grid)'),
        'tolerance': 'rel_l2 1e-5',
    })


# ------------------------------------------------------------------------------------------ clip

def clip(root, g, tok_dir, cfg_kw, prompts):
    from trellis.pipelines.trellis_text_to_3d import TrellisTextTo3DPipeline
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **cfg_kw)
    model = CLIPTextModel(cfg).eval()
    init_hf(model, g, 0.5)
    d = os.path.join(root, 'conditioners', 'clip_alt')
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    for f in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(d, f))
    tok = AutoTokenizer.from_pretrained(d)
    stub = types.SimpleNamespace(text_cond_model={'model': CLIPTextModel.from_pretrained(d).eval(), 'tokenizer': tok})
    hidden = TrellisTextTo3DPipeline.encode_text(stub, prompts)
    enc = tok(prompts, max_length=77, padding='max_length', truncation=True, return_tensors='pt')
    n_tokens = [len(tok(p)['input_ids']) for p in prompts]
    assert max(n_tokens) > 77
    write_fixture(d, 'conditioner:clip_text', {'input_ids': enc['input_ids'].int(),
                                               'attention_mask': enc['attention_mask'].int(),
                                               'last_hidden_state': hidden}, {
        'desc': 'Tiny CLIPTextModel (transformers, random weights; HF format: config.json + model.safetensors) with the real '
                'CLIP BPE tokenizer (tokenizer.json, copied from the visible clip_text_tiny fixture).',
        'prompts': prompts,
        'untruncated_token_counts': n_tokens,
        'trellis_conditioning': 'TrellisTextTo3DPipeline.encode_text: tokenizer(text, max_length=77, padding="max_length", '
                                'truncation=True) -> CLIPTextModel(input_ids=ids).last_hidden_state [B,77,C] (NO '
                                'attention_mask is passed: pad tokens are attended under the causal mask; the '
                                'final_layer_norm is included).',
        'truncation': 'longer prompts: [BOS] + first 75 tokens + [EOS]',
        'tolerance': 'input_ids exact; last_hidden_state rel_l2 1e-5',
    })


# ------------------------------------------------------------------------------------------- sets

LONG = ('a weathered bronze statue of a knight on horseback, cape flowing, sword raised toward the storm clouds, '
        'standing on a mossy granite pedestal covered with carved runes, lichen and bird droppings, surrounded by '
        'fallen autumn leaves, ivy, broken lanterns, cobblestones, puddles reflecting the sky, and a small wooden '
        'bench with a forgotten red umbrella, highly detailed, photorealistic, 8k, studio lighting, octane render')

SETS = {
    1: {
        'images': [
            (300, 200, {'kind': 'ellipse', 'box': (0.2, 0.15, 0.85, 0.9), 'blur': 3}),
            (128, 512, {'kind': 'rect', 'box': (0.0, 0.3, 0.97, 1.0)}),
            (517, 519, {'kind': 'polygon', 'points': [(0.1, 0.9), (0.5, 0.05), (0.93, 0.7), (0.45, 0.55)],
                        'ramp': True, 'blur': 1}),
            (640, 960, {'kind': 'blobs', 'n': 6, 'blur': 2}),
        ],
        'dino': dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_register_tokens=2, image_size=518,
                     patch_size=14, mlp_ratio=4, layerscale_value=1.0, hidden_act='gelu', layer_norm_eps=1e-6,
                     qkv_bias=False, use_swiglu_ffn=False, drop_path_rate=0.0),
        'dino_direct': [
            ('dino_alt_direct_224', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_register_tokens=4, image_size=224, patch_size=14, mlp_ratio=4,
                                         layerscale_value=1.0, hidden_act='gelu', layer_norm_eps=1e-6,
                                         qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0), 3, 224, 224),
        ],
        'clip': dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                     hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=64),
        'prompts': ['', 'a red wooden chair', LONG, 'A Low-Poly FOX!!', 'two   spaces\tand\ttabs',
                    'Ünïcödé — “quotes” and emoji 🎉🦊', "it's a 3D-printed vase (v2.0), 15cm tall; 50% off",
                    'a ' * 75, 'a ' * 76, 'b' * 300],
    },
    2: {
        'images': [
            (64, 48, {'kind': 'blobs', 'n': 4, 'scale': 0.9}),
            (700, 333, {'kind': 'ellipse', 'box': (-0.2, 0.5, 0.6, 1.3), 'blur': 6}),
            (256, 256, {'kind': 'rect', 'box': (0.4, 0.45, 0.41, 0.9)}),
            (90, 91, {'kind': 'threshold'}),
            (33, 200, {'kind': 'nearly_opaque'}),
        ],
        'dino': dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, num_register_tokens=0, image_size=224,
                     patch_size=14, mlp_ratio=3, layerscale_value=1.0, hidden_act='gelu', layer_norm_eps=1e-6,
                     qkv_bias=True, use_swiglu_ffn=True, drop_path_rate=0.0),
        'dino_direct': [
            ('dino_alt_direct_nonsquare', dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                               num_register_tokens=3, image_size=224, patch_size=14, mlp_ratio=4,
                                               layerscale_value=1.0, hidden_act='gelu', layer_norm_eps=1e-6,
                                               qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0), 3, 266, 380),
            ('dino_alt_direct_p16', dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_register_tokens=4, image_size=224, patch_size=16, mlp_ratio=4,
                                         layerscale_value=1.0, hidden_act='gelu', layer_norm_eps=1e-6,
                                         qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0), 1, 224, 230),
        ],
        'clip': dict(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1,
                     hidden_act='gelu', layer_norm_eps=1e-5, projection_dim=32),
        'prompts': [LONG + ' ' + LONG, 'x', '   ', 'C++ & Rust <3 // comments /* too */',
                    'numbers: 007 3.1415926535 -42 1e10 #hashtag @user', '日本語のテキスト and mixed ASCII',
                    'a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a '
                    'a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a',
                    'special <|endoftext|> tokens <|startoftext|> inside', 'UPPER lower MiXeD\n\nnew lines  ',
                    'cafe\u0301 vs caf\u00e9, \uff26\uff55\uff4c\uff4c\u3000width, nbsp\u00a0here, zwj \U0001F468\u200d\U0001F469',
                    "DON'T WE'LL it\u2019s O'Neil's 'quoted' \"double\"", '\u0645\u0631\u062d\u0628\u0627 \ud55c\uad6d\uc5b4 '
                    '\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \u00df\u0130\u0131 1234567890123 0.5x', '\x07bell\x00nul\x1fctrl'],
    },
}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out')
    ap.add_argument('seed', type=int)
    ap.add_argument('--set', type=int, default=1, choices=[1, 2])
    ap.add_argument('--tokenizer', default=os.path.join(HERE, '..', '..', '..', 'shared', 'reference', 'conditioners',
                                                         'clip_text_tiny'))
    a = ap.parse_args()
    assert transformers.__version__ == '5.24.0', transformers.__version__
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    s = SETS[a.set]
    print(f'gen_conditioners: set {a.set}, seed {a.seed} -> {a.out}')
    images = preprocess(a.out, rng, s['images'])
    dinov2(a.out, g, images, s['dino'])
    for name, cfg_kw, batch, h, w in s.get('dino_direct', []):
        dinov2_direct(a.out, g, name, cfg_kw, batch, h, w)
    clip(a.out, g, a.tokenizer, s['clip'], s['prompts'])
