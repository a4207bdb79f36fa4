import pytest
import torch
import torch.nn.functional as F

import twins_mm
from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS
from twins_mm.models.twins import GlobalSubsampledAttention, LocallyGroupedAttention

from tests.helpers import VARIANTS, build_backbone

# Reference section 1.9: official ImageNet models (= n_parameters in the official logs).
OFFICIAL_CLS_PARAMS = {
    ('TwinsPCPVT', 'small'): 24_106_216, ('TwinsPCPVT', 'base'): 43_828_456,
    ('TwinsPCPVT', 'large'): 60_989_672, ('TwinsSVT', 'small'): 24_060_776,
    ('TwinsSVT', 'base'): 56_070_952, ('TwinsSVT', 'large'): 99_271_400,
}
STAGE_NORM_PARAMS = {('TwinsSVT', 'small'): 1920, ('TwinsSVT', 'base'): 2880,
                     ('TwinsSVT', 'large'): 3840}


def expected_shapes(arch_dims, h, w):
    shapes, h, w = [], h // 4, w // 4
    for i, c in enumerate(arch_dims):
        if i:
            h, w = h // 2, w // 2
        shapes.append((c, h, w))
    return shapes


@pytest.mark.parametrize('family,arch', VARIANTS)
def test_parameter_counts_match_official(family, arch):
    model = build_backbone(family, arch)
    c3 = model.embed_dims[-1]
    n = sum(p.numel() for p in model.parameters())
    stage_norms = sum(p.numel() for p in model.norm_list.parameters())
    assert stage_norms == STAGE_NORM_PARAMS.get((family, arch), 0)
    # backbone + 1000-class linear head + final norm, per-stage norms excluded
    assert n - stage_norms + (1000 * c3 + 1000) + 2 * c3 == OFFICIAL_CLS_PARAMS[(family, arch)]


@pytest.mark.parametrize('family,arch', VARIANTS)
def test_output_shapes_all_variants(family, arch):
    model = build_backbone(family, arch).eval()
    sizes = [(224, 224), (33, 47), (200, 328)]
    if arch == 'small':
        sizes.append((512, 512))
    with torch.inference_mode():
        for h, w in sizes:
            outs = model(torch.randn(1, 3, h, w))
            assert [tuple(o.shape[1:]) for o in outs] == expected_shapes(model.embed_dims, h, w)
            assert all(torch.isfinite(o).all() for o in outs)
            assert all(o.is_contiguous() for o in outs)


def test_out_indices_select_stages():
    model = twins_mm.TwinsSVT('small', out_indices=(1, 3)).eval()
    outs = model(torch.randn(2, 3, 64, 96))
    assert [o.shape[1] for o in outs] == [128, 512]
    assert outs[0].shape[0] == 2


def test_svt_alternates_lsa_gsa_in_every_stage():
    for arch, preset in SVT_ARCHS.items():
        model = twins_mm.TwinsSVT(arch)
        for i, stage in enumerate(model.blocks):
            assert len(stage) == preset['depths'][i]
            for j, block in enumerate(stage):
                kind = LocallyGroupedAttention if j % 2 == 0 else GlobalSubsampledAttention
                assert type(block.attn) is kind, (arch, i, j)
    model = twins_mm.TwinsPCPVT('large')
    assert all(type(b.attn) is GlobalSubsampledAttention for s in model.blocks for b in s)


def test_layernorm_eps_and_structure():
    model = twins_mm.TwinsSVT('small')
    assert model.patch_embeds[0].norm.eps == 1e-5
    assert model.blocks[0][0].norm1.eps == 1e-6 and model.blocks[0][0].norm2.eps == 1e-6
    assert model.blocks[0][1].attn.norm.eps == 1e-5
    assert all(n.eps == 1e-6 for n in model.norm_list)
    assert not hasattr(model.blocks[3][1].attn, 'sr')  # sr = 1: global attention
    pcpvt = twins_mm.TwinsPCPVT('small')
    assert all(isinstance(n, torch.nn.Identity) for n in pcpvt.norm_list)
    keys = set(pcpvt.state_dict())
    assert not any(k.startswith(('head.', 'norm.', 'cls_token', 'pos_embed')) for k in keys)
    assert 'pos_block.0.proj.0.weight' in keys


def test_peg_runs_once_per_stage_after_block_zero():
    model = twins_mm.TwinsPCPVT('small').eval()
    calls = []
    for i, peg in enumerate(model.pos_block):
        peg.register_forward_hook(lambda m, a, o, i=i: calls.append(('peg', i)))
    for i, stage in enumerate(model.blocks):
        for j, blk in enumerate(stage):
            blk.register_forward_hook(lambda m, a, o, i=i, j=j: calls.append(('blk', i, j)))
    model(torch.randn(1, 3, 64, 64))
    for i in range(4):
        pos = calls.index(('peg', i))
        assert calls[pos - 1] == ('blk', i, 0) and calls.count(('peg', i)) == 1


def test_norm_after_stage_feeds_next_stage():
    on = twins_mm.TwinsSVT('small').eval()
    off = twins_mm.TwinsSVT('small', norm_after_stage=False).eval()
    off.load_state_dict({k: v for k, v in on.state_dict().items() if 'norm_list' not in k})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # Non-trivial stage norms: if they only touched the outputs, stage 1's input would
        # not change; it does, so stage 1's output differs beyond the norm itself.
        for n in on.norm_list:
            n.weight.data.uniform_(0.5, 1.5)
        a, b = on(x), off(x)
    assert torch.allclose(a[0], F.layer_norm(b[0].permute(0, 2, 3, 1), (64, ), on.norm_list[0].weight,
                                             on.norm_list[0].bias, 1e-6).permute(0, 3, 1, 2),
                          atol=1e-5)
    assert not torch.allclose(
        a[1], F.layer_norm(b[1].permute(0, 2, 3, 1), (128, ), on.norm_list[1].weight,
                           on.norm_list[1].bias, 1e-6).permute(0, 3, 1, 2), atol=1e-3)


@pytest.mark.parametrize('bad', ['tiny', 'x', 7])
def test_unknown_arch_lists_choices(bad):
    with pytest.raises(ValueError, match='small'):
        twins_mm.TwinsSVT(arch=bad)


def test_arch_aliases_and_dict():
    assert twins_mm.TwinsPCPVT('b').arch_settings == PCPVT_ARCHS['base']
    custom = dict(PCPVT_ARCHS['small'], depths=[1, 1, 1, 1])
    model = twins_mm.TwinsPCPVT(custom)
    assert [len(s) for s in model.blocks] == [1, 1, 1, 1]


@pytest.mark.parametrize('patch,match', [
    (dict(depths=[1, 1, 1]), 'one value per stage'),
    (dict(num_heads=[3, 2, 5, 8]), 'divisible'),
    (dict(window_sizes=[7] * 4), 'unexpected'),
])
def test_inconsistent_arch_dict(patch, match):
    with pytest.raises(ValueError, match=match) as err:
        twins_mm.TwinsPCPVT(dict(PCPVT_ARCHS['small'], **patch))
    assert 'small' in str(err.value)


def test_bad_inputs_give_clear_errors():
    model = twins_mm.TwinsSVT('small').eval()
    with pytest.raises(ValueError, match='in_channels=3 but the input has 1 channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32.*got 31x64'):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match='4-D'):
        model(torch.randn(3, 64, 64))
    model4 = twins_mm.TwinsSVT('small', in_channels=4).eval()
    assert model4(torch.randn(1, 4, 32, 32))[3].shape == (1, 512, 1, 1)


def test_frozen_stages_and_eval_mode():
    model = twins_mm.TwinsSVT('small', frozen_stages=2, drop_path_rate=0.2)
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.split('.')[:2] in ([p, s] for p in ('patch_embeds', 'pos_block', 'blocks',
                                                        'norm_list') for s in ('0', '1'))}
    assert frozen == expected and expected
    for i in range(2):
        assert all(not m.training for m in model.blocks[i].modules())
    assert all(m.training for m in model.blocks[2].modules())
    stem_only = twins_mm.TwinsSVT('small', frozen_stages=0).train()
    assert {n for n, p in stem_only.named_parameters() if not p.requires_grad} == \
        {n for n, _ in stem_only.named_parameters() if n.startswith('patch_embeds.0.')}
    with pytest.raises(ValueError, match='frozen_stages'):
        twins_mm.TwinsSVT('small', frozen_stages=5)


def test_norm_eval_keeps_norms_in_eval():
    model = twins_mm.TwinsPCPVT('small', norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(not m.training for m in norms)
    assert model.blocks[0][0].mlp.training
    assert all(m.training for m in twins_mm.TwinsPCPVT('small').train().modules())


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_with_cp_same_outputs_and_gradients(family):
    """Checkpointed blocks recompute their forward in backward: the stochastic-depth draw
    must replay, or the recomputed activations (and the gradients) belong to another draw."""
    ref = build_backbone(family, 'small', drop_path_rate=0.5).train()
    ckp = build_backbone(family, 'small', drop_path_rate=0.5, with_cp=True).train()
    ckp.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 64, 80)
    draws = {}  # (model, module name) -> the keep masks it drew, in order
    for tag, model in (('ref', ref), ('cp', ckp)):
        for name, m in model.named_modules():
            if hasattr(m, 'draw_keep'):
                log, real = draws.setdefault((tag, name), []), m.draw_keep
                m.draw_keep = lambda *a, real=real, log=log: log.append(real(*a)) or log[-1]
    outs = []
    for model in (ref, ckp):
        torch.manual_seed(0)  # the same draws in both models
        outs.append(model(x))
        sum(o.square().mean() for o in outs[-1]).backward()
    outs_ref, outs_cp = outs
    ref_draws = {name: d for (tag, name), d in draws.items() if tag == 'ref' and d}
    assert any(0 < int(k.sum()) < len(k) for d in ref_draws.values() for k in d), \
        'the draw must drop some samples of some branches'
    for name, d in ref_draws.items():
        # attention and MLP branch in forward, the same two again in the recomputation
        assert len(d) == 2 and len(draws[('cp', name)]) == 4, name
        for a, b in zip(d * 2, draws[('cp', name)]):
            assert torch.equal(a, b), name
    for a, b in zip(outs_ref, outs_cp):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), ckp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_drop_path_linear_schedule():
    model = twins_mm.TwinsSVT('small', drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for s in model.blocks for b in s]
    expected = torch.linspace(0, 0.2, 18).tolist()
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize('keep', [[True, True, True], [True, False, True], [False, False, False]])
def test_stochastic_depth_skips_dropped_samples_exactly(keep):
    """Same outputs and gradients as the multiply-by-mask form, for the same draw."""
    torch.manual_seed(0)
    block = twins_mm.models.twins.TwinsBlock(
        twins_mm.models.twins.LocallyGroupedAttention(32, 2, 7), 32, 4, drop_path=0.25).train()
    block.drop_path.draw_keep = lambda batch, device: torch.tensor(keep, device=device)
    x = torch.randn(3, 9, 11, 32, requires_grad=True)
    out = block(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()], allow_unused=True)

    weight = torch.tensor(keep, dtype=torch.float32).view(3, 1, 1, 1) / 0.75
    ref = x + block.attn(block.norm1(x)) * weight
    ref = ref + block.mlp(block.norm2(ref)) * weight
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        # every parameter gets a gradient (DDP without find_unused_parameters needs it)
        assert g is not None
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_stochastic_depth_keeps_samples_at_the_right_rate():
    depth = twins_mm.models.twins.StochasticDepth(0.3).train()
    torch.manual_seed(0)
    kept = torch.stack([depth.draw_keep(4, torch.device('cpu')) for _ in range(5000)]).float().mean().item()
    assert abs(kept - 0.7) < 0.01
    # eval mode and rate 0 leave the branch on: output = x + branch(x)
    x = torch.randn(2, 3)
    branch = lambda t, residual=None: (residual if residual is not None else 0) + 2 * t  # noqa
    assert torch.equal(depth.eval()(x, branch), 3 * x)


# ----------------------------------------------------------------------------- arguments
def test_pretrained_alias_loads_like_init_cfg(tmp_path):
    """``pretrained=PATH`` (what mmseg's EncoderDecoder hands its backbone) warns and loads
    the file exactly as ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``."""
    from twins_mm.testing import official_state_dict
    sd = official_state_dict('TwinsPCPVT', 'small', seed=3)
    path = str(tmp_path / 'pcpvt_small.pth')
    torch.save(sd, path)
    with pytest.warns(DeprecationWarning, match='pretrained is deprecated'):
        model = twins_mm.TwinsPCPVT('small', pretrained=path)
    assert model.init_cfg == dict(type='Pretrained', checkpoint=path)
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    with pytest.raises(ValueError, match='either init_cfg or pretrained'):
        twins_mm.TwinsPCPVT('small', pretrained=path,
                            init_cfg=dict(type='Pretrained', checkpoint=path))


def test_negative_and_int_out_indices_count_from_the_end():
    full = twins_mm.TwinsSVT('small').eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        all_outs = full(x)
        for out_indices, stages in (((-1, ), (3, )), ((-4, -2), (0, 2)), (2, (2, )),
                                    ((0, -1), (0, 3))):
            picked = twins_mm.TwinsSVT('small', out_indices=out_indices).eval()
            picked.load_state_dict(full.state_dict())
            assert picked.out_indices == stages
            outs = picked(x)
            assert len(outs) == len(stages)
            for out, stage in zip(outs, stages):
                assert torch.equal(out, all_outs[stage]), (out_indices, stage)


@pytest.mark.parametrize('out_indices', [(4, ), (-5, ), (0, 1, 2, 3, 4), ()])
def test_out_of_range_out_indices_are_refused(out_indices):
    with pytest.raises(ValueError, match=r'out_indices must be stage indices in \[0, 3\]'):
        twins_mm.TwinsPCPVT('small', out_indices=out_indices)


def test_norm_after_stage_per_stage_list():
    """A list switches the per-stage norm stage by stage: where it is off the stage output is
    the plain one, where it is on it is LayerNorm(eps 1e-6) of it (the last stage feeds no
    later stage, so the earlier outputs are unchanged)."""
    plain = twins_mm.TwinsSVT('small', norm_after_stage=False).eval()
    last = twins_mm.TwinsSVT('small', norm_after_stage=[False, False, False, True]).eval()
    assert [type(n).__name__ for n in last.norm_list] == ['Identity'] * 3 + ['LayerNorm']
    last.load_state_dict(plain.state_dict(), strict=False)
    norm = last.norm_list[3]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
        x = torch.randn(1, 3, 64, 96)
        a, b = plain(x), last(x)
        for i in range(3):
            assert torch.equal(a[i], b[i]), i
        expected = F.layer_norm(a[3].permute(0, 2, 3, 1), (512, ), norm.weight, norm.bias,
                                1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(b[3], expected, rtol=0, atol=1e-5)
    for bad in ([True] * 3, [True] * 5):
        with pytest.raises(ValueError, match=r'one bool per stage \(4\)'):
            twins_mm.TwinsSVT('small', norm_after_stage=bad)


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_qkv_bias_false_equals_zero_biases(family):
    """Without qkv_bias the q / kv / qkv projections have no bias parameter at all, and the
    model computes what the biased one computes with those biases at zero."""
    biased = getattr(twins_mm, family)('small').eval()
    unbiased = getattr(twins_mm, family)('small', qkv_bias=False).eval()
    qkv_bias = {k for k in biased.state_dict()
                if k.endswith(('attn.q.bias', 'attn.kv.bias', 'attn.qkv.bias'))}
    # PCPVT-S: 16 blocks x (q, kv); SVT-S: 9 LSA blocks (qkv) + 9 GSA blocks (q, kv)
    assert len(qkv_bias) == (32 if family == 'TwinsPCPVT' else 27)
    assert set(unbiased.state_dict()) == set(biased.state_dict()) - qkv_bias
    assert all(k in unbiased.state_dict() for k in biased.state_dict()
               if k.endswith('attn.proj.bias'))
    with torch.no_grad():
        for key in qkv_bias:
            biased.state_dict()[key].normal_(0, 0.5)
        unbiased.load_state_dict({k: v for k, v in biased.state_dict().items()
                                  if k not in qkv_bias})
        x = torch.randn(1, 3, 64, 96)
        with_bias = biased(x)
        for key in qkv_bias:
            biased.state_dict()[key].zero_()
        zero_bias, without = biased(x), unbiased(x)
    for w, z, n in zip(with_bias, zero_bias, without):
        torch.testing.assert_close(n, z, rtol=0, atol=1e-5)
        assert (w - z).abs().max() > 1e-2  # the biases did matter


def test_frozen_stages_all_four_freezes_everything():
    """frozen_stages=4: no parameter trains and every module stays in eval mode, so even
    with stochastic depth a forward in train() mode equals the eval forward."""
    model = twins_mm.TwinsPCPVT('small', frozen_stages=4, drop_path_rate=0.5)
    model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    # only the containers (the model, its ModuleLists) keep the flag, which they do not use
    assert [n for n, m in model.named_modules()
            if m.training and n and not isinstance(m, torch.nn.ModuleList)] == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model(x)
        eval_out = model.eval()(x)
    for a, b in zip(train_out, eval_out):
        assert torch.equal(a, b)


def test_default_initialisation_follows_the_official_definition():
    """Without init_cfg, init_weights() sets what the official code's ``_init_weights`` sets:
    Linear weight trunc-normal std 0.02 (bounds -2, 2) and bias 0, LayerNorm weight 1 and
    bias 0, Conv2d weight normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels/groups
    and bias 0. Standard deviations are checked per layer within 6 standard errors of the
    estimate. torch's trunc_normal_ maps a uniform draw of exactly +-1 to the bound (+-2, i.e.
    100 std): about one such value per million weights, as in the official models; those are
    left out of the standard deviation."""
    model = twins_mm.TwinsSVT('small')
    model.init_weights()
    seen, clamped, total = set(), 0, 0

    def check_std(name, w, std):
        assert abs(w.mean().item()) < 6 * std / w.numel() ** 0.5, name
        assert abs(w.std().item() / std - 1) < 6 / (2 * w.numel()) ** 0.5, (name, w.std(), std)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
            w = m.weight.detach().double().flatten()
            assert w.abs().max() <= 2, name
            inner = w[w.abs() < 0.2]
            clamped, total = clamped + (w.numel() - inner.numel()), total + w.numel()
            check_std(name, inner, 0.02)
            seen.add('linear')
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
            seen.add('norm')
        elif isinstance(m, torch.nn.Conv2d):
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
            k0, k1 = m.kernel_size
            check_std(name, m.weight.detach().double().flatten(),
                      (2.0 / (k0 * k1 * m.out_channels / m.groups)) ** 0.5)
            seen.add('conv')
    assert seen == {'linear', 'norm', 'conv'}
    assert clamped <= 10 and clamped / total < 2e-6, (clamped, total)
