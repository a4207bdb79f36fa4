"""The 18 Mask2Former, Cascade Mask R-CNN and DINO recipes (docs/recipes.md).

- Each equals the upstream recipe it follows, read from the installed mmseg / mmdet, except
  at the settings it states (compared key by key), and those settings hold the values the
  recipes document (widths of docs/reference.md 1.2, drop path of 1.8, the optimiser).
- Every variant's optimiser, built from its config around its built backbone, gives no weight
  decay to the PEG and to every LayerNorm (found by module type, not by the config's keys)
  and the recipe's lr multiplier to the whole backbone.
- The S variants build as whole models, compute their losses with a gradient in every backbone
  parameter, and predict. B and L differ from S only in the backbone and the channel keys,
  which the first two checks cover without building their heads.
"""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MMDET, MMSEG = 'mmdet::', 'mmseg::'

# docs/reference.md 1.1, 1.2: backbone class, arch, stage widths, ImageNet file.
VARIANTS = {
    'pcpvt_s': ('TwinsPCPVT', 'small', [64, 128, 320, 512], 'pcpvt_small_'),
    'pcpvt_b': ('TwinsPCPVT', 'base', [64, 128, 320, 512], 'pcpvt_base_'),
    'pcpvt_l': ('TwinsPCPVT', 'large', [64, 128, 320, 512], 'pcpvt_large_'),
    'svt_s': ('TwinsSVT', 'small', [64, 128, 256, 512], 'alt_gvt_small_'),
    'svt_b': ('TwinsSVT', 'base', [96, 192, 384, 768], 'alt_gvt_base_'),
    'svt_l': ('TwinsSVT', 'large', [128, 256, 512, 1024], 'alt_gvt_large_'),
}
# Per head: the recipe followed, the config suffix, the keys (dotted paths) where ours may
# differ from it, and the backbone lr multiplier of its optimiser.
RECIPES = {
    'mask2former': SimpleNamespace(
        source=MMSEG + 'mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py',
        suffix='160k', scope='mmseg', backbone_lr_mult=0.1,
        differs={'custom_imports', 'model.backbone', 'model.decode_head.in_channels',
                 'optim_wrapper.paramwise_cfg.custom_keys',
                 # variables of our configs (no effect by themselves)
                 'checkpoint', 'twins_backbone_no_decay_keys', 'backbone_no_decay',
                 'embed_no_decay'}),
    'cascade_mask_rcnn': SimpleNamespace(
        source=MMDET + 'convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_'
        'amp-ms-crop-3x_coco.py',
        suffix='3x', scope='mmdet', backbone_lr_mult=1.0,
        differs={'custom_imports', 'model.backbone', 'model.neck.in_channels',
                 'optim_wrapper', 'checkpoint'}),
    'dino': SimpleNamespace(
        source=MMDET + 'dino/dino-4scale_r50_8xb2-12e_coco.py',
        suffix='12e', scope='mmdet', backbone_lr_mult=0.1,
        differs={'custom_imports', 'model.backbone', 'model.neck.in_channels',
                 'optim_wrapper.paramwise_cfg.custom_keys', 'checkpoint',
                 'twins_backbone_no_decay_keys'}),
}
ALL = [(head, variant) for head in RECIPES for variant in VARIANTS]


def config_path(head, variant):
    return osp.join(REPO, 'configs', f'{head}_twins_{variant}_{RECIPES[head].suffix}.py')


def without_scope(value):
    """A config value without the ``_scope_`` keys that inheriting through ``mmseg::`` /
    ``mmdet::`` adds (the scope is the library's own either way)."""
    if isinstance(value, dict):
        return {k: without_scope(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(without_scope(v) for v in value)
    return value


def flatten(value, prefix=''):
    """{dotted path: leaf value} of a config dict; lists are leaves."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(flatten(sub, f'{prefix}.{key}' if prefix else str(key)))
        return out
    return {prefix: value}


_sources = {}


def upstream_file(name):
    """The file of an upstream config name ('mmseg::folder/file.py'), as installed."""
    import importlib.util
    package, rel = name.split('::')
    root = importlib.util.find_spec(package).submodule_search_locations[0]
    return osp.join(root, '.mim', 'configs', rel)


def source_recipe(head):
    if head not in _sources:
        _sources[head] = Config.fromfile(upstream_file(RECIPES[head].source),
                                        import_custom_modules=False).to_dict()
    return _sources[head]


def differing_paths(ours, theirs):
    """The dotted paths where the two configs differ (a key missing on one side too)."""
    a, b = flatten(without_scope(ours)), flatten(without_scope(theirs))
    return {k for k in a.keys() | b.keys() if a.get(k, KeyError) != b.get(k, KeyError)}


def covered(path, allowed):
    return any(path == p or path.startswith(p + '.') for p in allowed)


@pytest.mark.parametrize('head,variant', ALL, ids=[f'{h}_{v}' for h, v in ALL])
def test_differs_from_its_source_recipe_only_where_stated(head, variant):
    recipe = RECIPES[head]
    cfg = Config.fromfile(config_path(head, variant))
    ours = cfg.to_dict()
    paths = differing_paths(ours, source_recipe(head))
    unexpected = sorted(p for p in paths if not covered(p, recipe.differs))
    assert not unexpected, f'differs from {recipe.source} at {unexpected}'
    # ... and each stated difference is one (a key listed for nothing would hide changes),
    # except the channels: SVT-B's widths are Swin-T's and ConvNeXt-T's.
    listed_for_nothing = sorted(d for d in recipe.differs if not d.endswith('in_channels')
                                and not any(covered(p, {d}) for p in paths))
    assert not listed_for_nothing

    family, arch, widths, weights = VARIANTS[variant]
    assert cfg.custom_imports.imports[-1] == 'twins_mm'
    assert cfg.default_scope == recipe.scope
    backbone = cfg.model.backbone
    assert backbone.type == family and backbone.arch == arch
    assert backbone.init_cfg.type == 'Pretrained'
    assert osp.basename(backbone.init_cfg.checkpoint).startswith(weights)
    assert backbone.init_cfg.checkpoint.startswith(
        'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/')
    # The official Twins dense-task drop path (docs/reference.md 1.8): segmentation 0.2 and
    # 0.3 for SVT-L, detection 0.2 for all.
    expected_drop_path = 0.3 if (head, variant) == ('mask2former', 'svt_l') else 0.2
    assert backbone.drop_path_rate == expected_drop_path
    if head == 'mask2former':
        assert backbone.out_indices == (0, 1, 2, 3)
        assert cfg.model.decode_head.in_channels == widths
    elif head == 'cascade_mask_rcnn':
        assert backbone.out_indices == (0, 1, 2, 3)
        assert cfg.model.neck.in_channels == widths
    else:
        assert backbone.out_indices == (1, 2, 3)
        assert cfg.model.neck.in_channels == widths[1:]


def test_the_source_recipes_settings_that_the_docs_quote():
    """docs/recipes.md quotes these settings of the source recipes; the recipes keep them
    (the test above shows they equal the sources)."""
    m2f = Config.fromfile(config_path('mask2former', 'svt_s'))
    opt = m2f.optim_wrapper
    assert (opt.type, opt.optimizer.type, opt.optimizer.lr, opt.optimizer.weight_decay,
            opt.optimizer.eps) == ('OptimWrapper', 'AdamW', 1e-4, 0.05, 1e-8)
    assert opt.clip_grad == dict(max_norm=0.01, norm_type=2)
    assert m2f.train_cfg.max_iters == 160000 and m2f.train_dataloader.batch_size == 2
    assert m2f.crop_size == (512, 512) and m2f.model.decode_head.num_queries == 100
    [poly] = m2f.param_scheduler
    assert (poly.type, poly.power, poly.end) == ('PolyLR', 0.9, 160000)

    cascade = Config.fromfile(config_path('cascade_mask_rcnn', 'svt_s'))
    opt = cascade.optim_wrapper
    assert opt.type == 'AmpOptimWrapper' and 'constructor' not in opt
    assert (opt.optimizer.type, opt.optimizer.lr, opt.optimizer.weight_decay) == \
        ('AdamW', 1e-4, 0.05)
    assert cascade.train_cfg.max_epochs == 36
    warmup, steps = cascade.param_scheduler
    assert (warmup.end, warmup.start_factor, steps.milestones) == (1000, 0.001, [27, 33])
    assert [h.loss_bbox.type for h in cascade.model.roi_head.bbox_head] == ['GIoULoss'] * 3

    dino = Config.fromfile(config_path('dino', 'svt_s'))
    opt = dino.optim_wrapper
    assert (opt.optimizer.type, opt.optimizer.lr, opt.optimizer.weight_decay) == \
        ('AdamW', 1e-4, 1e-4)
    assert opt.clip_grad == dict(max_norm=0.1, norm_type=2)
    assert dino.train_cfg.max_epochs == 12
    [steps] = dino.param_scheduler
    assert steps.milestones == [11]
    assert dino.model.num_queries == 900 and dino.model.neck.num_outs == 4
    assert dino.model.encoder.layer_cfg.self_attn_cfg.num_levels == 4
    assert dino.model.decoder.layer_cfg.cross_attn_cfg.num_levels == 4


class _Holder(torch.nn.Module):
    """The parameter names a detector / segmentor gives its backbone ('backbone.*')."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def build_backbone(cfg):
    init_default_scope(cfg.default_scope)
    from mmengine.registry import MODELS
    backbone_cfg = cfg.model.backbone.copy()
    return MODELS.build(dict(backbone_cfg, _scope_=cfg.default_scope))


def param_groups(model, cfg):
    """{parameter name: (lr, weight decay)} as the config's optimiser sets them up."""
    wrapper_cfg = cfg.optim_wrapper.to_dict()
    if wrapper_cfg['type'] == 'AmpOptimWrapper':  # it refuses a CPU; the groups are the same
        wrapper_cfg['type'] = 'OptimWrapper'
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g['lr'], g['weight_decay'])
            for g in wrapper.optimizer.param_groups for p in g['params']}


def assert_twins_rules(backbone, groups, cfg, lr_mult):
    base_lr, base_wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    no_decay = {f'backbone.pos_block.{n}' for n, _ in backbone.pos_block.named_parameters()}
    no_decay |= {f'backbone.{m}.{n}' for m, mod in backbone.named_modules()
                 if isinstance(mod, torch.nn.LayerNorm) for n, _ in mod.named_parameters()}
    assert len(no_decay) > 40
    for name, (lr, wd) in groups.items():
        if not name.startswith('backbone.'):
            continue
        assert lr == pytest.approx(base_lr * lr_mult), name
        assert wd == (0. if name in no_decay else pytest.approx(base_wd)), name


@pytest.mark.parametrize('head,variant', ALL, ids=[f'{h}_{v}' for h, v in ALL])
def test_optimiser_gives_no_decay_to_every_peg_and_norm(head, variant):
    """With the backbone alone under its real name: every variant has other block counts,
    so a key list that misses blocks of one variant fails here."""
    cfg = Config.fromfile(config_path(head, variant))
    backbone = build_backbone(cfg)
    family, arch, widths, _ = VARIANTS[variant]
    assert type(backbone).__name__ == family and backbone.embed_dims == widths
    last_block = backbone.blocks[-1][-1]
    assert last_block.drop_path.drop_prob == pytest.approx(cfg.model.backbone.drop_path_rate)
    groups = param_groups(_Holder(backbone), cfg)
    assert_twins_rules(backbone, groups, cfg, RECIPES[head].backbone_lr_mult)


# ------------------------------------------------------------------ whole S models
SIZE = 64


def det_batch(with_mask):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(2, [[3, SIZE, SIZE + 32], [3, SIZE + 32, SIZE]], num_items=[2, 1],
                          num_classes=80, with_mask=with_mask)


def seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8))
        label = torch.randint(0, 4, (1, SIZE, SIZE), generator=g) * 30
        label[:, :4] = 255
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE),
                                 pad_shape=(SIZE, SIZE)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


# One S model per head here, the other family's S in tests/e2e/test_e2e_modern_recipes.py.
S_MODELS = [('mask2former', 'pcpvt_s'), ('cascade_mask_rcnn', 'svt_s'), ('dino', 'pcpvt_s')]


def shrink_for_cpu(cfg, head):
    """Fewer samples per image, the same code paths: Cascade Mask R-CNN's 4conv1fc box heads
    on 512 RoIs per image in three stages cost tens of CPU seconds a step; DINO's two-stage
    query selection takes the top num_queries of the encoder's tokens, and a 64x96 image has
    only 128 tokens at strides 8-64 (a COCO image has over 16,000), so 900 cannot be chosen."""
    if head == 'cascade_mask_rcnn':
        cfg.model.train_cfg.rpn_proposal.max_per_img = 100
        for stage in cfg.model.train_cfg.rcnn:
            stage.sampler.num = 32
        cfg.model.test_cfg.rpn.max_per_img = 50
        cfg.model.test_cfg.rcnn.score_thr = 0.  # an untrained model scores all under 0.05
    elif head == 'dino':
        cfg.model.num_queries = 50
        cfg.model.test_cfg.max_per_img = 50


@pytest.mark.parametrize('head,variant', S_MODELS, ids=[f'{h}_{v}' for h, v in S_MODELS])
def test_s_models_build_train_a_step_and_predict(head, variant):
    cfg = Config.fromfile(config_path(head, variant))
    shrink_for_cpu(cfg, head)
    scope = cfg.default_scope
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
        cfg.model.data_preprocessor.size = (SIZE, SIZE)
        packed = seg_batch()
    else:
        from mmdet.registry import MODELS
        packed = det_batch(with_mask=head == 'cascade_mask_rcnn')
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # as the Runner does off-GPU
    widths = VARIANTS[variant][2]
    if head == 'mask2former':
        # The pixel decoder projects the three coarsest maps (in_channels, coarse first)
        # and the 1x1 lateral conv reads the stride-4 map.
        decoder = model.decode_head.pixel_decoder
        assert [c.conv.in_channels for c in decoder.input_convs] == widths[:0:-1]
        assert decoder.lateral_convs[0].conv.in_channels == widths[0]
    elif head == 'cascade_mask_rcnn':
        assert [c.conv.in_channels for c in model.neck.lateral_convs] == widths
        assert len(model.roi_head.bbox_head) == 3
    else:
        assert [c.conv.in_channels for c in model.neck.convs] == widths[1:]
        assert model.neck.extra_convs[0].conv.in_channels == widths[-1]
    # The metafile's parameter count is this model's (DINO here selects 50 queries, not 900:
    # 850 fewer query embeddings of 256).
    count = sum(p.numel() for p in model.parameters())
    if head == 'dino':
        count += (900 - 50) * 256
    assert metafile_parameters(head, variant) == (
        count if head == 'mask2former' else pytest.approx(count / 1e6, abs=0.05))
    model.train()
    data = model.data_preprocessor(packed, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.backbone.named_parameters() if p.grad is None]
    assert not no_grad, f'backbone parameters without gradient: {no_grad[:5]}'
    assert_twins_rules(model.backbone, param_groups(model, cfg), cfg,
                       RECIPES[head].backbone_lr_mult)

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(packed, False)
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 2
    for sample, result in zip(packed['data_samples'], results):
        if scope == 'mmseg':
            assert result.pred_sem_seg.data.shape == (1, SIZE, SIZE)
        else:
            pred = result.pred_instances
            assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels) > 0
            if head == 'cascade_mask_rcnn':
                assert tuple(pred.masks.shape[1:]) == tuple(sample.ori_shape)


def metafile_models():
    import yaml
    listed = {}
    for name in ('metafile-seg.yml', 'metafile-det.yml'):
        with open(osp.join(REPO, 'configs', name)) as f:
            listed.update({m['Config']: m for m in yaml.safe_load(f)['Models']})
    return listed


def metafile_parameters(head, variant):
    meta = metafile_models()[osp.relpath(config_path(head, variant), REPO)]['Metadata']
    return meta['Parameters'] if head == 'mask2former' else meta['Parameters (M)']


def test_metafiles_list_every_recipe_without_results():
    """`mim search twins_mm` reads these entries (tests/test_install_metadata.py runs it)."""
    listed = metafile_models()
    for head, variant in ALL:
        config = osp.relpath(config_path(head, variant), REPO)
        model = listed[config]
        assert model['Name'] == osp.splitext(osp.basename(config))[0]
        assert model['Metadata']['Note'] == \
            'no published result; built and trained on demo data only'
        results = model['Results'] if isinstance(model['Results'], list) else [model['Results']]
        assert results and all(r['Metrics'] == {} for r in results)
        assert model['Metadata'].get('Epochs', model['Metadata'].get('Iterations')) == \
            {'mask2former': 160000, 'cascade_mask_rcnn': 36, 'dino': 12}[head]
