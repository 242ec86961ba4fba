"""float32 SDPA stand-in for the flash_attn entry points TRELLIS calls (CPU only)."""
import torch
import torch.nn.functional as F


def _dense(q, k, v):
    # q [B,L,H,D] -> [B,H,L,D]
    o = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3).float(), k.permute(0, 2, 1, 3).float(),
                                       v.permute(0, 2, 1, 3).float())
    return o.permute(0, 2, 1, 3).to(q.dtype)


def flash_attn_func(q, k, v):
    return _dense(q, k, v)


def flash_attn_qkvpacked_func(qkv):
    return _dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


def flash_attn_kvpacked_func(q, kv):
    return _dense(q, kv[:, :, 0], kv[:, :, 1])


def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q=None, max_k=None):
    outs = []
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        outs.append(_dense(q[None, a:b], k[None, c:d], v[None, c:d])[0])
    return torch.cat(outs, 0)


def flash_attn_varlen_qkvpacked_func(qkv, cu, max_len=None):
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu)


def flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max_q=None, max_k=None):
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu_k)
