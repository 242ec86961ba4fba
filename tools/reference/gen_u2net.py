"""Background-removal fixtures and the U2NET checkpoint manifest, recorded from the REFERENCE code:
U-2-Net's `model/u2net.py` (github.com/xuebinqin/U-2-Net, Apache-2.0), rembg's `u2net` session and
`remove` (github.com/danielgatis/rembg, MIT), and TRELLIS' `preprocess_image`. Nothing of theirs is
copied here: they are imported from their own checkouts / packages at record time.

    OMP_NUM_THREADS=1 python gen_u2net.py OUT SEED [--u2net DIR] [--manifest FILE]

  --u2net DIR   a checkout of xuebinqin/U-2-Net (default ../../../U-2-Net); `DIR/model/u2net.py` is imported.
  needs         torch, numpy, Pillow, safetensors, rembg (`pip install rembg`; onnxruntime is NOT needed: the
                session's inner ONNX session is replaced by the torch network), and TRELLIS_ORIG (common.py).

Writes:
  OUT/u2net_tiny/    kind model:U2NET. The reference `U2NET.forward` on a network whose stages are the reference
                     RSU7/RSU6/RSU5/RSU4/RSU4F classes at tiny widths (config.json `args`: in_ch, out_ch and the
                     `[in, mid, out]` widths of every stage; the published U2NET / U2NETP differ only there),
                     random weights and BatchNorm statistics, eval mode. Inputs of odd sizes (ceil-mode pooling,
                     unequal upsampling). io: x, d0..d6 (after sigmoid), every stage output. The same weights are
                     also saved with torch.save as a zip checkpoint (model_zip.pth) and a legacy one
                     (model_legacy.pth, `_use_new_zipfile_serialization=False`), with num_batches_tracked.
  OUT/rembg_tiny/    kind preprocess:rembg. TrellisImageTo3DPipeline.preprocess_image (the original method) on
                     opaque RGB images, its rembg session a real rembg U2netSession whose inner session runs
                     this folder's tiny U2NET in torch. io: rgb_in_<i> (uint8 HxWx3), mask320_<i> (the uint8 matte
                     before the resize back), mask_<i>, cutout_<i> (the RGBA rembg.remove returns), rgb518_<i>
                     (preprocess_image's output) for some images.
  --manifest FILE    the state_dict of the reference `U2NET(3, 1)` (names, shapes, dtypes), in the format of
                     shared/reference/manifests.

Weights: conv weights N(0, 1/fan_in), conv biases N(0, 0.05^2), BatchNorm weight 1 + N(0, 0.1^2), bias N(0, 0.05^2),
running_mean N(0, 0.1^2), running_var U(0.5, 1.5); num_batches_tracked as constructed.
"""
import one_thread  # noqa: F401  (first: one thread for torch, see one_thread.py)
import argparse
import json
import os
import sys
import types

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))

# rembg imports onnxruntime at module level; the network here runs in torch instead.
if 'onnxruntime' not in sys.modules:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        import importlib.machinery
        _ort = types.ModuleType('onnxruntime')
        _ort.__spec__ = importlib.machinery.ModuleSpec('onnxruntime', None)
        _ort.SessionOptions = object
        _ort.InferenceSession = object
        _ort.get_device = lambda: 'CPU'
        _ort.get_available_providers = lambda: ['CPUExecutionProvider']
        _ort.set_default_logger_severity = lambda _level: None
        sys.modules['onnxruntime'] = _ort
import rembg  # the real package: import it before common.py, which stubs rembg  # noqa: E402
from rembg.sessions.u2net import U2netSession  # noqa: E402

sys.path.insert(0, HERE)
from common import *  # noqa: E402,F401,F403
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

STAGES = ['stage1', 'stage2', 'stage3', 'stage4', 'stage5', 'stage6',
          'stage5d', 'stage4d', 'stage3d', 'stage2d', 'stage1d']


def import_u2net(d):
    sys.path.insert(0, d)
    from model import u2net as ref  # noqa: E402
    return ref


def build(ref, args):
    """The reference U2NET with the reference RSU blocks at the given widths (forward: U2NET.forward)."""
    kinds = {'stage1': ref.RSU7, 'stage2': ref.RSU6, 'stage3': ref.RSU5, 'stage4': ref.RSU4,
             'stage5': ref.RSU4F, 'stage6': ref.RSU4F, 'stage5d': ref.RSU4F, 'stage4d': ref.RSU4,
             'stage3d': ref.RSU5, 'stage2d': ref.RSU6, 'stage1d': ref.RSU7}

    class Sized(ref.U2NET):
        def __init__(self):
            nn.Module.__init__(self)
            out = args['out_ch']
            for i, s in enumerate(STAGES):
                setattr(self, s, kinds[s](*args[s]))
                if i < 5:
                    setattr(self, f'pool{i + 1}{i + 2}', nn.MaxPool2d(2, stride=2, ceil_mode=True))
            side_in = [args['stage1d'][2], args['stage2d'][2], args['stage3d'][2], args['stage4d'][2],
                       args['stage5d'][2], args['stage6'][2]]
            for i, c in enumerate(side_in):
                setattr(self, f'side{i + 1}', nn.Conv2d(c, out, 3, padding=1))
            self.outconv = nn.Conv2d(6 * out, out, 1)

    return Sized()


FULL = {'in_ch': 3, 'out_ch': 1, 'stage1': [3, 32, 64], 'stage2': [64, 32, 128], 'stage3': [128, 64, 256],
        'stage4': [256, 128, 512], 'stage5': [512, 256, 512], 'stage6': [512, 256, 512],
        'stage5d': [1024, 256, 512], 'stage4d': [1024, 128, 256], 'stage3d': [512, 64, 128],
        'stage2d': [256, 32, 64], 'stage1d': [128, 16, 64]}
TINY = {'in_ch': 3, 'out_ch': 1, 'stage1': [3, 4, 6], 'stage2': [6, 4, 8], 'stage3': [8, 4, 8],
        'stage4': [8, 4, 8], 'stage5': [8, 4, 8], 'stage6': [8, 4, 8], 'stage5d': [16, 4, 8],
        'stage4d': [16, 4, 8], 'stage3d': [16, 4, 8], 'stage2d': [16, 4, 6], 'stage1d': [12, 4, 6]}


def randomize(m, g):
    for name, p in m.named_parameters():
        if p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        elif 'bn_s1.weight' in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    for name, b in m.named_buffers():
        if name.endswith('running_mean'):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith('running_var'):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def tensor_meta(io, descs):
    return {k: {'shape': list(v.shape), 'dtype': str(v.dtype).replace('torch.', ''), 'desc': descs.get(k, '')}
            for k, v in io.items()}


def write(d, kind, cfg, net, io, meta):
    os.makedirs(d, exist_ok=True)
    json.dump({'name': 'U2NET', 'args': cfg}, open(os.path.join(d, 'config.json'), 'w'), indent=1)
    sd = net.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith('num_batches_tracked')},
              os.path.join(d, 'model.safetensors'))
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(d, 'io.safetensors'))
    meta = dict(kind=kind, **meta)
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'), indent=1)


def network_fixture(ref, out, seed):
    g = torch.Generator().manual_seed(seed)
    net = build(ref, TINY).eval()
    randomize(net, g)
    x = torch.randn((2, 3, 45, 37), generator=g)
    captured = {}
    hooks = [getattr(net, s).register_forward_hook(
        lambda _m, _i, o, s=s: captured.__setitem__('hx' + s[5:], o.clone())) for s in STAGES]
    with torch.no_grad():
        ds = net(x)
    for h in hooks:
        h.remove()
    io = {'x': x}
    for i, d in enumerate(ds):
        io[f'd{i}'] = d
    io.update(captured)
    d = os.path.join(out, 'u2net_tiny')
    descs = {'x': 'input [B, 3, H, W] (odd H and W: ceil-mode pools, unequal upsampling)',
             'd0': 'sigmoid(outconv(cat(side1..side6))): the matte', **{f'd{i}': f'sigmoid(side{i}), upsampled to '
                                                                         'the input size' for i in range(1, 7)}}
    for s in STAGES:
        descs['hx' + s[5:]] = f'output of {s} (forward hook)'
    write(d, 'model:U2NET', TINY, net, io, {
        'desc': 'U2NET.forward of xuebinqin/U-2-Net model/u2net.py with its RSU blocks at tiny widths (config.json '
                'args), random weights and BatchNorm statistics, eval mode.',
        'weights': 'model.safetensors (num_batches_tracked left out) = model_zip.pth (torch.save, zip) = '
                   'model_legacy.pth (torch.save, _use_new_zipfile_serialization=False), both full state_dicts',
        'tensors': tensor_meta(io, descs),
        'tolerance': 'rel_l2 1e-5',
    })
    sd = net.state_dict()
    torch.save(sd, os.path.join(d, 'model_zip.pth'))
    torch.save(sd, os.path.join(d, 'model_legacy.pth'), _use_new_zipfile_serialization=False)
    return net


class TorchInner:
    """Stands in for rembg's onnxruntime InferenceSession: runs the torch U2NET."""

    def __init__(self, net):
        self.net = net

    def get_inputs(self):
        return [types.SimpleNamespace(name='input.1')]

    def run(self, _names, feed):
        x = torch.from_numpy(feed['input.1'])
        with torch.no_grad():
            ds = self.net(x)
        self.last = ds[0].numpy()
        return [d.numpy() for d in ds]


def synthetic_photo(w, h, g):
    """An opaque RGB image: a smooth background and a brighter ellipse with texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bg = 60 + 40 * np.sin(xx / 17.0)[..., None] * np.array([1.0, 0.6, 0.3]) + 30 * (yy / h)[..., None]
    cx, cy = w * 0.55, h * 0.45
    r = ((xx - cx) / (0.3 * w)) ** 2 + ((yy - cy) / (0.35 * h)) ** 2
    obj = np.stack([200 - 40 * r, 120 + 60 * np.cos(xx / 5.0), 90 + 50 * r], -1)
    inside = (r < 1.0)[..., None]
    img = np.where(inside, obj, bg) + g.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def rembg_fixture(ref, out, seed):
    from trellis.pipelines.trellis_image_to_3d import TrellisImageTo3DPipeline
    g = torch.Generator().manual_seed(seed + 1)
    net = build(ref, TINY).eval()
    randomize(net, g)
    sess = U2netSession.__new__(U2netSession)
    sess.model_name = 'u2net'
    sess.inner_session = TorchInner(net)
    pipe = types.SimpleNamespace(rembg_session=sess)
    rng = np.random.default_rng(seed)
    # (w, h, record rgb518): the second is wider than 1024 (downscaled first).
    sizes = [(118, 97, True), (1030, 40, False)]
    io = {}
    descs = {}
    for i, (w, h, keep518) in enumerate(sizes):
        rgb = synthetic_photo(w, h, rng)
        img = Image.fromarray(rgb, 'RGB')
        # preprocess_image's own steps before rembg, then rembg.remove, as preprocess_image calls them.
        out518 = TrellisImageTo3DPipeline.preprocess_image(pipe, img)
        pred = sess.inner_session.last[:, 0, :, :]
        # The uint8 matte before its resize back, as U2netSession.predict computes it.
        p = (pred - pred.min()) / (pred.max() - pred.min())
        mask320 = (np.squeeze(p).clip(0, 1) * 255).astype('uint8')
        scale = min(1, 1024 / max(img.size))
        small = img if scale >= 1 else img.resize((int(img.width * scale), int(img.height * scale)),
                                                  Image.Resampling.LANCZOS)
        mask = sess.predict(small)[0]
        cut = rembg.remove(small, session=sess)
        io[f'rgb_in_{i}'] = torch.from_numpy(rgb)
        io[f'mask320_{i}'] = torch.from_numpy(mask320)
        io[f'mask_{i}'] = torch.from_numpy(np.array(mask))
        io[f'cutout_{i}'] = torch.from_numpy(np.array(cut))
        descs[f'rgb_in_{i}'] = f'opaque RGB input {w}x{h} (uint8 HxWx3)'
        descs[f'mask320_{i}'] = 'uint8 matte at 320x320: min-max normalised sigmoid(d0), clip, *255, truncated'
        descs[f'mask_{i}'] = 'the matte resized (LANCZOS) to the image size after the <=1024 downscale'
        descs[f'cutout_{i}'] = 'rembg.remove output (RGBA): naive_cutout = Image.composite(rgb, transparent, mask)'
        if keep518:
            io[f'rgb518_{i}'] = torch.from_numpy(np.array(out518))
            descs[f'rgb518_{i}'] = 'TrellisImageTo3DPipeline.preprocess_image output (uint8 518x518x3)'
    d = os.path.join(out, 'rembg_tiny')
    write(d, 'preprocess:rembg', TINY, net, io, {
        'desc': 'The no-alpha branch of TrellisImageTo3DPipeline.preprocess_image: convert RGB, downscale to <= 1024 '
                'px (LANCZOS), rembg.remove with a rembg U2netSession (BaseSession.normalize to 320x320, '
                'U2netSession.predict) whose inner session runs this folder\'s tiny U2NET in torch, then the alpha '
                'crop and 518 resize.',
        'tensors': tensor_meta(io, descs),
        'tolerance': 'uint8 tensors: max abs difference 1',
    })


def manifest(ref, path):
    net = ref.U2NET(3, 1)
    sized = build(ref, FULL)
    a = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in sized.state_dict().items()}
    assert a == b, 'the sized builder must reproduce U2NET(3, 1) exactly'
    sd = net.state_dict()
    params = dict(net.named_parameters())
    entries = [{'key': k, 'shape': list(v.shape), 'dtype': str(v.dtype).replace('torch.', ''),
                'kind': 'parameter' if k in params else 'buffer'} for k, v in sd.items()]
    m = {
        'checkpoint': 'u2net',
        'config': {'name': 'U2NET', 'args': {'in_ch': 3, 'out_ch': 1}},
        'config_source': 'U2NET(3, 1) of xuebinqin/U-2-Net model/u2net.py (u2net_test.py builds it so for u2net.pth)',
        'num_parameters': sum(p.numel() for p in net.parameters()),
        'num_state_dict_entries': len(entries),
        'state_dict': entries,
    }
    json.dump(m, open(path, 'w'), indent=1)
    print(f'manifest: {len(entries)} entries, {m["num_parameters"]} parameters -> {path}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('out')
    ap.add_argument('seed', type=int)
    ap.add_argument('--u2net', default=os.path.join(HERE, '..', '..', '..', 'U-2-Net'))
    ap.add_argument('--manifest')
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = import_u2net(os.path.abspath(a.u2net))
    network_fixture(ref, a.out, a.seed)
    rembg_fixture(ref, a.out, a.seed)
    if a.manifest:
        manifest(ref, a.manifest)


if __name__ == '__main__':
    main()
