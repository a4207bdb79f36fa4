"""Random checkpoints in the foreign key layouts, for tests and the demo.

Pretrained weights cannot be downloaded everywhere; these files exercise the same loading
code as the real ones. The official layout is written from the key table of the official
ImageNet checkpoints (docs/reference.md, section 2.1), not from twins_mm's modules.
"""
from collections import OrderedDict

import torch

from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS


def official_state_dict(family: str, arch: str, num_classes: int = 1000, seed: int = 0,
                        with_stage_norms: bool = False) -> 'OrderedDict[str, torch.Tensor]':
    """An ImageNet-style checkpoint of the official ``CPVTV2`` / ``ALTGVT`` model."""
    svt = family == 'TwinsSVT'
    s = (SVT_ARCHS if svt else PCPVT_ARCHS)[arch]
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()

    def put(key, *shape):
        sd[key] = torch.randn(*shape, generator=g) * 0.02

    prev = 3
    for i, c in enumerate(s['embed_dims']):
        p = 4 if i == 0 else 2
        put(f'patch_embeds.{i}.proj.weight', c, prev, p, p)
        put(f'patch_embeds.{i}.proj.bias', c)
        sd[f'patch_embeds.{i}.norm.weight'] = 1 + torch.randn(c, generator=g) * 0.1
        put(f'patch_embeds.{i}.norm.bias', c)
        put(f'pos_block.{i}.proj.0.weight', c, 1, 3, 3)
        put(f'pos_block.{i}.proj.0.bias', c)
        hidden = int(c * s['mlp_ratios'][i])
        for j in range(s['depths'][i]):
            b = f'blocks.{i}.{j}'
            for n in ('norm1', 'norm2'):
                sd[f'{b}.{n}.weight'] = 1 + torch.randn(c, generator=g) * 0.1
                put(f'{b}.{n}.bias', c)
            if svt and j % 2 == 0:
                put(f'{b}.attn.qkv.weight', 3 * c, c)
                put(f'{b}.attn.qkv.bias', 3 * c)
            else:
                put(f'{b}.attn.q.weight', c, c)
                put(f'{b}.attn.q.bias', c)
                put(f'{b}.attn.kv.weight', 2 * c, c)
                put(f'{b}.attn.kv.bias', 2 * c)
                sr = s['sr_ratios'][i]
                if sr > 1:
                    put(f'{b}.attn.sr.weight', c, c, sr, sr)
                    put(f'{b}.attn.sr.bias', c)
                    sd[f'{b}.attn.norm.weight'] = 1 + torch.randn(c, generator=g) * 0.1
                    put(f'{b}.attn.norm.bias', c)
            put(f'{b}.attn.proj.weight', c, c)
            put(f'{b}.attn.proj.bias', c)
            put(f'{b}.mlp.fc1.weight', hidden, c)
            put(f'{b}.mlp.fc1.bias', hidden)
            put(f'{b}.mlp.fc2.weight', c, hidden)
            put(f'{b}.mlp.fc2.bias', c)
        if with_stage_norms:
            sd[f'norm_list.{i}.weight'] = 1 + torch.randn(c, generator=g) * 0.1
            put(f'norm_list.{i}.bias', c)
        prev = c
    if num_classes:
        sd['norm.weight'] = torch.ones(prev)
        sd['norm.bias'] = torch.zeros(prev)
        put('head.weight', num_classes, prev)
        put('head.bias', num_classes)
    return sd
