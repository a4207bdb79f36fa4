"""The drop-in recipe of docs/detection.md: the configs printed there, written to files as a
user would, inherit UNMODIFIED upstream configs, build, load an official-layout ImageNet
checkpoint and train one iteration through the upstream data pipeline."""
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner

from twins_mm.demo_data.ade20k import make_ade20k
from twins_mm.demo_data.coco import make_coco
from twins_mm.testing import official_state_dict

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DOC = osp.join(REPO, 'docs', 'detection.md')


def recipe_configs():
    """{file name: text} of the python blocks whose first line names a config file."""
    with open(DOC) as f:
        blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
    return {m.group(1): block for block in blocks
            if (m := re.match(r'# (\S+\.py)\n', block))}


def write_recipe(tmp_path, name):
    recipes = recipe_configs()
    assert name in recipes, f'{name} is no longer in {DOC}: {sorted(recipes)}'
    path = tmp_path / name
    path.write_text(recipes[name])
    return Config.fromfile(str(path))


def small_loader_cfg(cfg, data_root, edits):
    loader = cfg.train_dataloader.to_dict()
    loader.update(batch_size=2, num_workers=0, persistent_workers=False)
    loader['dataset']['data_root'] = data_root
    for index, changes in edits.items():
        loader['dataset']['pipeline'][index].update(changes)
    return loader


def train_one_iteration(cfg, loader_cfg, family, arch, tmp_path):
    """Builds the model, loads the fake ImageNet file through init_cfg, trains one batch."""
    checkpoint = official_state_dict(family, arch, seed=1)
    ckpt_path = str(tmp_path / 'imagenet.pth')
    torch.save({'model': checkpoint}, ckpt_path)
    cfg.model.backbone.init_cfg.checkpoint = ckpt_path

    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # as the Runner does on one CPU
    assert type(model.backbone).__name__ == family
    model.init_weights()
    stem = model.backbone.patch_embeds[0].proj.weight
    torch.testing.assert_close(stem.detach(), checkpoint['patch_embeds.0.proj.weight'])

    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    batch = next(iter(Runner.build_dataloader(loader_cfg, seed=0)))
    before = stem.detach().clone()
    model.train()
    log = model.train_step(batch, wrapper)
    assert log and all(torch.isfinite(v).all() for v in log.values())
    assert not torch.equal(before, stem.detach()), 'the backbone did not train'
    return log


def test_recipe_mmdet_faster_rcnn(tmp_path):
    cfg = write_recipe(tmp_path, 'faster-rcnn_twins-svt-s_fpn_1x_coco.py')
    assert cfg.model.type == 'FasterRCNN' and cfg.default_scope == 'mmdet'
    root = make_coco(str(tmp_path / 'coco'), num_train=4, num_val=1, size=(128, 96))
    # Test-only: small images. The pipeline is upstream's (Resize index 2).
    loader = small_loader_cfg(cfg, root, {2: dict(scale=(128, 96))})
    log = train_one_iteration(cfg, loader, 'TwinsSVT', 'small', tmp_path)
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox'} <= set(log)


def test_recipe_mmseg_segformer(tmp_path):
    cfg = write_recipe(tmp_path, 'segformer_twins-pcpvt-s_8xb2-160k_ade20k-512x512.py')
    assert cfg.model.type == 'EncoderDecoder' and cfg.default_scope == 'mmseg'
    root = make_ade20k(str(tmp_path / 'ade'), num_train=2, num_val=1, size=64)
    # Test-only: 64-pixel crops instead of 512 (RandomResize index 2, RandomCrop index 3).
    cfg.model.data_preprocessor.size = (64, 64)
    loader = small_loader_cfg(cfg, root, {2: dict(scale=(256, 64)), 3: dict(crop_size=(64, 64))})
    log = train_one_iteration(cfg, loader, 'TwinsPCPVT', 'small', tmp_path)
    assert 'decode.loss_ce' in log


@pytest.mark.parametrize('name', ['faster-rcnn_twins-svt-s_fpn_1x_coco.py',
                                  'segformer_twins-pcpvt-s_8xb2-160k_ade20k-512x512.py'])
def test_recipe_channels_match_the_backbone(tmp_path, name):
    """The widths the recipe gives the neck / head are the backbone's real output channels."""
    cfg = write_recipe(tmp_path, name)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    reader = cfg.model.get('neck') or cfg.model.decode_head
    assert [f.shape[1] for f in feats] == list(reader.in_channels)


def test_documented_cpu_variant_of_the_amp_config(tmp_path):
    """docs/detection.md's CPU note: the inheriting config swaps AmpOptimWrapper (which
    needs a GPU) for OptimWrapper and keeps the optimiser and the no-decay rules."""
    text = recipe_configs()['mask_rcnn_twins_svt_s_3x_cpu.py']
    amp_path = osp.join(REPO, 'configs', 'mask_rcnn_twins_svt_s_3x.py')
    path = tmp_path / 'mask_rcnn_twins_svt_s_3x_cpu.py'
    path.write_text(text.replace("'./mask_rcnn_twins_svt_s_3x.py'", repr(amp_path)))
    cpu, amp = Config.fromfile(str(path)), Config.fromfile(amp_path)
    assert amp.optim_wrapper.type == 'AmpOptimWrapper'
    assert cpu.optim_wrapper.to_dict() == dict(
        type='OptimWrapper', optimizer=amp.optim_wrapper.optimizer.to_dict(),
        paramwise_cfg=amp.optim_wrapper.paramwise_cfg.to_dict())
    assert cpu.model.to_dict() == amp.model.to_dict()
    init_default_scope('mmdet')
    wrapper = build_optim_wrapper(torch.nn.ModuleDict({'norm': torch.nn.LayerNorm(4)}),
                                  cpu.optim_wrapper)
    assert type(wrapper).__name__ == 'OptimWrapper'
    assert wrapper.optimizer.param_groups[0]['weight_decay'] == 0.  # the 'norm' rule
