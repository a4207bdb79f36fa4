"""benchmark_train_loop.py: the three backbones really are swapped into the same configs,
and a short loop on demo data gives step times whose printed ratio is their quotient."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tools', 'analysis_tools'))

import benchmark_train_loop as loop  # noqa: E402
from tests.tools.test_benchmark_and_flops import table_rows  # noqa: E402


@pytest.mark.parametrize('task', ['fpn', 'retinanet'])
def test_same_config_with_each_backbone(task, tmp_path):
    """Only the backbone (and, for Swin-T, the neck's input widths) differs; the built
    models hold twins_mm's TwinsSVT, mmseg's SVT and mmdet's SwinTransformer."""
    import torch
    from mmengine.registry import MODELS, init_default_scope
    args = loop.parse_args(['--task', task, '--batch', '1'])
    cfgs = {b: loop.loop_cfg(task, b, args, str(tmp_path), str(tmp_path))
            for b in loop.BACKBONES}
    expected = {'twins_mm': ('TwinsSVT', 'twins_mm.models.twins'),
                'mmseg': ('SVT', 'mmseg.models.backbones.twins'),
                'swin-t': ('SwinTransformer', 'mmdet.models.backbones.swin')}
    base = cfgs['twins_mm'].to_dict()
    for name, cfg in cfgs.items():
        other = cfg.to_dict()
        assert other['model']['backbone']['drop_path_rate'] == 0.2
        for key in ('decode_head', 'bbox_head', 'data_preprocessor', 'train_cfg'):
            assert other['model'].get(key) == base['model'].get(key), (name, key)
        assert other['optim_wrapper'] == base['optim_wrapper']
        assert other['train_dataloader'] == base['train_dataloader']
        neck = dict(other['model']['neck'])
        assert neck.pop('in_channels') == (loop.SWIN_T_CHANNELS if name == 'swin-t'
                                           else loop.TWINS_CHANNELS)
        ref_neck = dict(base['model']['neck'])
        ref_neck.pop('in_channels')
        assert neck == ref_neck
        init_default_scope(cfg.default_scope)
        backbone = MODELS.build(cfg.model.backbone)
        assert (type(backbone).__name__, type(backbone).__module__) == expected[name]
        outs = backbone(torch.randn(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == list(other['model']['neck']['in_channels'])
    # CPU defaults: 1 warm-up + 3 timed iterations, no validation
    assert cfgs['twins_mm'].train_cfg == dict(type='IterBasedTrainLoop', max_iters=4,
                                              val_interval=5)
    assert cfgs['twins_mm'].val_dataloader is None


def test_short_loop_on_demo_data(capsys):
    """Semantic FPN with twins_mm for one timed iteration on CPU: a step time, img/s =
    batch / step, and the table's ratio column."""
    results = loop.main(['--task', 'fpn', '--backbone', 'twins_mm', '--seg-size', '64',
                         '--iters', '1', '--warmup', '1', '--num-images', '4', '--batch', '2'])
    res = results['fpn']['twins_mm']
    assert res['batch'] == 2 and res['step'] > 0
    assert res['img_s'] == pytest.approx(2 / res['step'])
    assert 0 < res['loop_img_s'] <= res['img_s'] * 1.001
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == ['model', 'backbone', 'batch', 'input', 'step ms', 'img/s',
                       'loop img/s', 'peak MiB', 'ours/X']
    assert rows[1][:4] == ['fpn', 'twins_mm', '2', '64x64 crops'] and rows[1][-1] == '1.00'
    assert float(rows[1][4]) == pytest.approx(res['step'] * 1e3, abs=0.06)


def test_amp_needs_a_gpu():
    with pytest.raises(SystemExit):
        loop.parse_args(['--amp', 'bf16'])
