"""Side-by-side CPU benchmark: the ORIGINAL TRELLIS (PyTorch) and trellis-rs on the same weights and inputs.

    python side_by_side.py compare [--nets ss-flow,slat-flow,mesh-decoder,dinov2-large] [--reps N]
                                   [--dir DIR] [--trellisd PATH] [--threads 2] [--voxels 20000] [--json OUT]
    python side_by_side.py prepare NET DIR [--voxels N]     # weights + inputs files (done by compare)
    python side_by_side.py orig NET DIR [--threads N]       # one forward of the original (done by compare)

`prepare` builds the original network at its official size (the `config` of the checkpoint manifest in
$TRELLIS_REFERENCE_DIR/manifests, float32, use_fp16 off; DINOv2-L with registers from transformers'
Dinov2WithRegistersModel, the model our conditioner twins), fills every parameter with seeded random
values (matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.05^2), other vectors N(0, 0.05^2)) and writes
DIR/NET.weights.safetensors (float32, TRELLIS key names; a Hugging Face folder for DINOv2) and
DIR/NET.inputs.safetensors (the SLat flow and mesh decoder get the `trellisd bench` 20,000-voxel shell at
64^3; cond [1, 1374, 1024]; t = 500; a 518x518 image for DINOv2).

`compare` then runs, for each repetition and network, `trellisd bench NET --weights --inputs` and
`side_by_side.py orig NET` as separate processes, alternating which goes first, and prints per network
the forward times, the ratio original / trellis-rs (above 1: trellis-rs is faster), the peak resident
memory during the forward (VmHWM reset after the weights are loaded, see daemon/src/bench/side_by_side.rs)
and the load average around each run. Each forward runs once per process.

Environment: TRELLIS_REFERENCE_DIR (manifests; default ../shared/reference beside the repository) and
TRELLIS_ORIG (default ../trellis-orig beside it) as in tools/reference. The original runs through tools/reference/common.py (TRELLIS_ORIG, the flash_attn shim =
float32 SDPA per sequence, spconv 2.3.8 native algorithm). DINOv2 needs transformers (5.24.0) importable.
The original runs with OMP_NUM_THREADS = torch threads = --threads; spconv's CPU scatter-add races with
more than one thread (tools/reference/README.md), which perturbs values but not the work done.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NETS = {
    'ss-flow': 'ss_flow_img_dit_L_16l8_fp16',
    'slat-flow': 'slat_flow_img_dit_L_64l8p2_fp16',
    'mesh-decoder': 'slat_dec_mesh_swin8_B_64l8m256c_fp16',
    'dinov2-large': None,
}
DINO_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
                   patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6, hidden_act='gelu')


def ref_dir():
    return os.environ.get('TRELLIS_REFERENCE_DIR', os.path.join(REPO, '..', 'shared', 'reference'))


def orig_dir():
    return os.environ.get('TRELLIS_ORIG', os.path.join(REPO, '..', 'trellis-orig'))


def status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def reset_peak():
    """VmHWM := VmRSS (Linux clear_refs 5); returns (old peak, current RSS) in KiB."""
    before = status_kib('VmHWM:')
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass
    return before, status_kib('VmRSS:')


def shell_coords(res, n):
    """`trellisd bench`'s shell: the n voxels of res^3 nearest a centred sphere of radius 0.375 res
    (ties by coordinate), sorted; [n, 4] int64 with batch index 0."""
    import numpy as np
    g = np.stack(np.meshgrid(*[np.arange(res)] * 3, indexing='ij'), -1).reshape(-1, 3)
    d = g.astype(np.float64) + 0.5 - res / 2.0
    dist = np.abs(np.sqrt((d * d).sum(1)) - 0.375 * res)
    order = np.lexsort((g[:, 2], g[:, 1], g[:, 0], dist))[:n]
    picked = g[order]
    picked = picked[np.lexsort((picked[:, 2], picked[:, 1], picked[:, 0]))]
    return np.concatenate([np.zeros((n, 1), np.int64), picked.astype(np.int64)], 1)


# ------------------------------------------------------------------------------------------------ original side

def import_original():
    os.environ['TRELLIS_ORIG'] = orig_dir()
    os.environ['TRELLIS_REFERENCE_DIR'] = ref_dir()
    sys.path.insert(0, os.path.join(REPO, 'tools', 'reference'))
    import common  # noqa: F401  (sets up the original on CPU)
    return common


def fill_random(model, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith('weight') and ('norm' in name or 'lambda' in name):
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def build_original(net):
    """The original network at the manifest's size, float32, random-initialised layout only."""
    stem = NETS[net]
    cfg = json.load(open(os.path.join(ref_dir(), 'manifests', stem + '.json')))['config']
    from trellis import models
    args = dict(cfg['args'])
    args['use_fp16'] = False
    m = getattr(models, cfg['name'])(**args)
    m.eval()
    return m


def spconv_train_mode(m):
    import spconv.pytorch as spconv
    for mod in m.modules():
        if isinstance(mod, spconv.conv.SparseConvolution):
            mod.train()   # spconv's CPU path refuses a fused bias in inference mode


def build_dino():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    cfg = Dinov2WithRegistersConfig(**DINO_CONFIG)
    cfg._attn_implementation = 'sdpa'
    return Dinov2WithRegistersModel(cfg).eval()


def prepare(net, d, voxels, seed):
    if net == 'dinov2-large':
        import transformers  # noqa: F401  (before common.py, which stubs it)
    import_original()
    import torch
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 1000)
    if net == 'dinov2-large':
        m = build_dino()
        fill_random(m, seed)
        m.save_pretrained(os.path.join(d, net + '.weights'), safe_serialization=True)
        inputs = {'image': torch.randn(1, 3, 518, 518, generator=g)}
    else:
        m = build_original(net)
        fill_random(m, seed)
        sd = {k: v.detach().float().contiguous() for k, v in m.state_dict().items()}
        save_file(sd, os.path.join(d, net + '.weights.safetensors'))
        if net == 'ss-flow':
            inputs = {'x': torch.randn(1, 8, 16, 16, 16, generator=g)}
        else:
            coords = torch.from_numpy(shell_coords(64, voxels))
            inputs = {'coords': coords, 'feats': torch.randn(coords.shape[0], 8, generator=g)}
        if net in ('ss-flow', 'slat-flow'):
            inputs['t'] = torch.tensor([500.0])
            inputs['cond'] = torch.randn(1, 1374, 1024, generator=g)
    save_file(inputs, os.path.join(d, net + '.inputs.safetensors'))
    print(f'prepared {net} in {d}: ' + ', '.join(f'{k}{list(v.shape)}' for k, v in inputs.items()))


def weights_path(net, d):
    return os.path.join(d, net + ('.weights' if net == 'dinov2-large' else '.weights.safetensors'))


def run_original(net, d, threads):
    if net == 'dinov2-large':
        import transformers  # noqa: F401
    import_original()
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    inputs = load_file(os.path.join(d, net + '.inputs.safetensors'))
    if net == 'dinov2-large':
        from transformers import Dinov2WithRegistersModel
        m = Dinov2WithRegistersModel.from_pretrained(weights_path(net, d), attn_implementation='sdpa').eval()
    else:
        m = build_original(net)
        m.load_state_dict(load_file(weights_path(net, d)))
        spconv_train_mode(m)
    build_s = time.perf_counter() - t0
    stages = []
    peak_load, rss_before = reset_peak()
    t1 = time.perf_counter()
    if net == 'ss-flow':
        y = m(inputs['x'], inputs['t'], inputs['cond'])
        checksum = float(y.float().pow(2).mean().sqrt())
    elif net == 'slat-flow':
        from trellis.modules import sparse as sp
        x = sp.SparseTensor(feats=inputs['feats'], coords=inputs['coords'].int())
        y = m(x, inputs['t'], inputs['cond'])
        checksum = float(y.feats.float().pow(2).mean().sqrt())
    elif net == 'mesh-decoder':
        from trellis.modules import sparse as sp
        x = sp.SparseTensor(feats=inputs['feats'], coords=inputs['coords'].int())
        marks = {}

        def mark(name):
            def hook(*_):
                marks.setdefault(name, time.perf_counter())   # returns None: inputs/outputs unchanged
            return hook
        m.upsample[0].register_forward_pre_hook(mark('torso'))
        m.out_layer.register_forward_pre_hook(mark('upsample'))
        m.out_layer.register_forward_hook(mark('out_layer'))
        meshes = m(x)
        marks['flexicubes'] = time.perf_counter()
        last = t1
        for k in ('torso', 'upsample', 'out_layer', 'flexicubes'):
            stages.append([k, marks[k] - last])
            last = marks[k]
        checksum = float(meshes[0].vertices.shape[0] + meshes[0].faces.shape[0])
    else:
        h = m.embeddings(inputs['image'])
        h = m.encoder(h).last_hidden_state
        y = F.layer_norm(h, h.shape[-1:])
        checksum = float(y.pow(2).mean().sqrt())
    forward_s = time.perf_counter() - t1
    peak = status_kib('VmHWM:')
    report = {'net': net, 'threads': torch.get_num_threads(), 'build_s': build_s, 'forward_s': forward_s,
              'stages': stages, 'rss_before_mib': rss_before / 1024, 'peak_forward_mib': peak / 1024,
              'peak_total_mib': max(peak, peak_load or 0) / 1024, 'checksum': checksum}
    print(f'{net}: build {build_s:.2f}s, forward {forward_s:.2f}s, peak during forward {peak / 1024:.1f} MiB')
    print('side-by-side: ' + json.dumps(report))


# ------------------------------------------------------------------------------------------------ driver

def run_side(cmd, env):
    la0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    la1 = os.getloadavg()[0]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('side-by-side: ')]
    if p.returncode != 0 or not line:
        raise SystemExit(f'{" ".join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    r = json.loads(line[-1][len('side-by-side: '):])
    r.update(load_before=la0, load_after=la1, process_s=wall)
    return r


def compare(a):
    nets = a.nets.split(',')
    for n in nets:
        if n not in NETS:
            raise SystemExit(f'unknown net {n!r} (known: {", ".join(NETS)})')
    trellisd = a.trellisd or os.path.join(os.environ.get('CARGO_TARGET_DIR', os.path.join(REPO, 'target')),
                                          'release', 'trellisd')
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TRELLIS_REFERENCE_DIR=os.path.abspath(ref_dir()), TRELLIS_ORIG=os.path.abspath(orig_dir()))
    for n in nets:
        stamp = os.path.join(a.dir, f'{n}.prepared')
        want = json.dumps({'voxels': a.voxels, 'seed': a.seed})
        if not (os.path.exists(stamp) and open(stamp).read() == want):
            subprocess.run([sys.executable, __file__, 'prepare', n, a.dir, '--voxels', str(a.voxels),
                            '--seed', str(a.seed)], env=env, check=True)
            open(stamp, 'w').write(want)
    results = {n: {'ours': [], 'orig': []} for n in nets}
    for rep in range(a.reps):
        for n in nets:
            ours = [trellisd, 'bench', n, '--threads', str(a.threads), '--weights', weights_path(n, a.dir),
                    '--inputs', os.path.join(a.dir, n + '.inputs.safetensors')]
            orig = [sys.executable, __file__, 'orig', n, a.dir, '--threads', str(a.threads)]
            order = [('ours', ours), ('orig', orig)]
            if rep % 2 == 1:
                order.reverse()
            for side, cmd in order:
                r = run_side(cmd, env)
                results[n][side].append(r)
                print(f'[rep {rep}] {n:<13} {side:<4} forward {r["forward_s"]:8.2f}s  peak(forward) '
                      f'{r["peak_forward_mib"]:8.1f} MiB  peak(total) {r["peak_total_mib"]:8.1f} MiB  '
                      f'load {r["load_before"]:.2f}->{r["load_after"]:.2f}  stages {r["stages"]}', flush=True)
    print()
    print('| network | trellis-rs forward | original forward | ratio orig/ours | trellis-rs peak (forward / total) '
          '| original peak (forward / total) | load avg |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for n in nets:
        o, p = results[n]['ours'], results[n]['orig']
        to = statistics.median(r['forward_s'] for r in o)
        tp = statistics.median(r['forward_s'] for r in p)
        ratios = [b['forward_s'] / a_['forward_s'] for a_, b in zip(o, p)]
        loads = [r['load_before'] for r in o + p]
        print(f'| {n} | {to:.2f} s | {tp:.2f} s | {statistics.median(ratios):.2f} '
              f'({", ".join(f"{x:.2f}" for x in ratios)}) | {max(r["peak_forward_mib"] for r in o):.0f} / '
              f'{max(r["peak_total_mib"] for r in o):.0f} MiB | {max(r["peak_forward_mib"] for r in p):.0f} / '
              f'{max(r["peak_total_mib"] for r in p):.0f} MiB | {min(loads):.1f}-{max(loads):.1f} |')
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(results, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('compare')
    c.add_argument('--nets', default=','.join(NETS))
    c.add_argument('--reps', type=int, default=1)
    c.add_argument('--dir', default='/tmp/trellis-side-by-side')
    c.add_argument('--trellisd')
    c.add_argument('--threads', type=int, default=2)
    c.add_argument('--voxels', type=int, default=20000)
    c.add_argument('--seed', type=int, default=0)
    c.add_argument('--json')
    p = sub.add_parser('prepare')
    p.add_argument('net', choices=list(NETS))
    p.add_argument('dir')
    p.add_argument('--voxels', type=int, default=20000)
    p.add_argument('--seed', type=int, default=0)
    o = sub.add_parser('orig')
    o.add_argument('net', choices=list(NETS))
    o.add_argument('dir')
    o.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    if a.cmd == 'compare':
        compare(a)
    elif a.cmd == 'prepare':
        prepare(a.net, a.dir, a.voxels, a.seed)
    else:
        run_original(a.net, a.dir, a.threads)


if __name__ == '__main__':
    main()
