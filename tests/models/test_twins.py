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
