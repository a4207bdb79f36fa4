"""tools/misc/swap_backbone.py (twins_mm.swap): the config it writes for upstream mmdet /
mmseg configs, and its errors.

Expected widths are the variants' embed_dims from docs/reference.md 1.2 (Twins-SVT-B:
96, 192, 384, 768; Twins-PCPVT-S: 64, 128, 320, 512), written out here. The source configs
are the ones installed with mmdet 3.3.0 / mmseg 1.2.2.
"""
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from tools.misc import swap_backbone as cli
from tests.helpers import metafiles_read_once
from twins_mm.swap import SwapError, resolve_source, swap_backbone

SVT_B = [96, 192, 384, 768]
PCPVT_S = [64, 128, 320, 512]
SVT_B_URL = ('https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/'
             'alt_gvt_base_20220308-1b7eb711.pth')
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]

SEM_FPN = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
DEEPLABV3PLUS = 'mmseg::deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024.py'
FASTFCN = 'mmseg::fastfcn/fastfcn_r50-d32_jpu_psp_4xb4-80k_ade20k-512x512.py'
KNET = 'mmseg::knet/knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512.py'
MASK2FORMER_SEG = 'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py'
MASK2FORMER_DET = 'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py'
DINO = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
RETINANET = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
YOLOX = 'mmdet::yolox/yolox_tiny_8xb8-300e_coco.py'
FASTER_CAFFE = 'mmdet::faster_rcnn/faster-rcnn_r50-caffe_fpn_1x_coco.py'
FASTER_C4 = 'mmdet::faster_rcnn/faster-rcnn_r50-caffe_c4-1x_coco.py'


def unscoped(value):
    """A config value without the ``_scope_`` keys mmengine adds to a ``pkg::`` base."""
    if isinstance(value, dict):
        return {k: unscoped(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(unscoped(v) for v in value)
    return value


def source_cfg(src):
    return Config.fromfile(resolve_source(src)[0])


@pytest.fixture(scope='module', autouse=True)
def read_metafiles_once():
    with metafiles_read_once():
        yield


@pytest.fixture(scope='module')
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp('swapped')


_CONVERTED = {}


def converted(outdir, src, name='twins_svt_b', **kwargs):
    """(text, config read back from the written file), once per source and variant."""
    key = (src, name, tuple(sorted(kwargs.items())))
    if key not in _CONVERTED:
        out = outdir / (src.replace('::', '_').replace('/', '_') + f'_{name}.py')
        swap_backbone(src, name, str(out), **kwargs)
        _CONVERTED[key] = (out.read_text(), Config.fromfile(str(out)))
    return _CONVERTED[key]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def assert_refused(tmp_path, src, name, *words, **kwargs):
    """The tool raises SwapError whose message holds every word, and writes nothing."""
    out = tmp_path / 'out' / 'refused.py'
    with pytest.raises(SwapError) as err:
        swap_backbone(src, name, str(out), **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not out.exists()
    if out.parent.exists():
        assert os.listdir(out.parent) == []  # no temporary file left either
    return str(err.value)


# ------------------------------------------------------------------ the written config
def test_written_config_inherits_the_source_and_changes_only_the_swap(outdir):
    text, cfg = converted(outdir, SEM_FPN)
    assert f"_base_ = ['{SEM_FPN}']" in text
    assert "custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)" in text
    src = source_cfg(SEM_FPN)
    # Everything outside the model (data, schedule, runtime) is the source's.
    for key in set(src.keys()) - {'model', 'optim_wrapper', 'custom_imports'}:
        assert unscoped(cfg[key]) == unscoped(src[key]), key
    assert unscoped(cfg.optim_wrapper.optimizer) == unscoped(src.optim_wrapper.optimizer)
    changed = {'backbone', 'neck', 'pretrained'}
    for key in set(src.model.keys()) - changed:
        assert unscoped(cfg.model[key]) == unscoped(src.model[key]), key
    assert cfg.model.backbone.to_dict() == dict(
        type='TwinsSVT', arch='base', out_indices=(0, 1, 2, 3), drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=SVT_B_URL))
    assert cfg.model.neck.in_channels == SVT_B
    assert {k: v for k, v in cfg.model.neck.items() if k != 'in_channels'} == \
        {k: v for k, v in src.model.neck.items() if k != 'in_channels'}
    # mmseg's EncoderDecoder would hand this to the backbone next to init_cfg.
    assert src.model.pretrained == 'open-mmlab://resnet50_v1c'
    assert cfg.model.pretrained is None
    # The comments say what changed and why.
    assert '# - model.neck.in_channels: [256, 512, 1024, 2048] -> [96, 192, 384, 768]' in text


def test_written_config_builds_with_the_twins_backbone(outdir):
    from mmseg.registry import MODELS
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    _, cfg = converted(outdir, SEM_FPN, 'twins_pcpvt_s')
    init_default_scope('mmseg')
    model_cfg = cfg.model.copy()
    model_cfg.backbone.init_cfg = None
    model = revert_sync_batchnorm(MODELS.build(model_cfg)).eval()
    assert type(model.backbone).__name__ == 'TwinsPCPVT'
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256] * 4  # the FPN's outputs


def test_local_source_is_inherited_by_a_relative_path(tmp_path):
    src = write(tmp_path / 'mine' / 'my_fpn.py',
                f"_base_ = ['{SEM_FPN}']\nmodel = dict(decode_head=dict(num_classes=7))\n")
    out = tmp_path / 'swapped' / 'my_fpn_twins.py'
    swap_backbone(src, 'twins_svt_b', str(out))
    assert "_base_ = ['../mine/my_fpn.py']" in out.read_text()
    cfg = Config.fromfile(str(out))
    assert cfg.model.decode_head.num_classes == 7
    assert cfg.model.neck.in_channels == SVT_B


def test_installed_config_path_is_written_as_its_package_name(tmp_path):
    path = resolve_source(SEM_FPN)[0]
    assert resolve_source(path) == (path, SEM_FPN)


def test_installed_config_mmengine_cannot_name_is_inherited_by_path(tmp_path):
    # mmengine's pattern for pkg:: names rejects the "+" of gn+ws.
    src = 'mmdet::gn+ws/faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py'
    path = resolve_source(src)[0]
    assert resolve_source(src) == (path, None)
    out = tmp_path / 'gnws.py'
    swap_backbone(src, 'twins_svt_b', str(out))
    assert f"_base_ = ['{path}']" in out.read_text()
    assert Config.fromfile(str(out)).model.neck.in_channels == SVT_B


def test_drop_path_rate_follows_twins_mm_configs(outdir):
    # Segmentation: 0.2, SVT-L 0.3 (configs/upernet_twins_svt_l_160k.py); detection: 0.2.
    assert converted(outdir, SEM_FPN, 'twins_svt_l')[1].model.backbone.drop_path_rate == 0.3
    assert converted(outdir, SEM_FPN, 'twins_pcpvt_l')[1].model.backbone.drop_path_rate == 0.2
    assert converted(outdir, RETINANET, 'twins_svt_l')[1].model.backbone.drop_path_rate == 0.2


# ------------------------------------------------------------------ levels
@pytest.mark.parametrize('src,out_indices,neck', [
    (RETINANET, (0, 1, 2, 3), SVT_B),
    (DINO, (1, 2, 3), SVT_B[1:]),
])
def test_out_indices_of_the_replaced_backbone_are_kept(outdir, src, out_indices, neck):
    assert tuple(source_cfg(src).model.backbone.out_indices) == out_indices
    cfg = converted(outdir, src)[1]
    assert cfg.model.backbone.out_indices == out_indices
    assert cfg.model.neck.in_channels == neck


def test_out_indices_are_mapped_by_stride_for_backbones_that_index_otherwise(outdir):
    # CSPDarknet's stages 2, 3, 4 give strides 8, 16, 32: Twins' stages 1, 2, 3.
    assert tuple(source_cfg(YOLOX).model.backbone.out_indices) == (2, 3, 4)
    cfg = converted(outdir, YOLOX)[1]
    assert cfg.model.backbone.out_indices == (1, 2, 3)
    assert cfg.model.neck.in_channels == SVT_B[1:]


# ------------------------------------------------------------------ channel keys
def test_deeplabv3plus_c1_in_channels(outdir):
    src = source_cfg(DEEPLABV3PLUS).model
    assert (src.decode_head.c1_in_channels, src.decode_head.in_channels) == (64, 512)
    cfg = converted(outdir, DEEPLABV3PLUS, allow_stride_change=True)[1].model
    assert cfg.backbone.out_indices == (0, 1, 2, 3)
    assert cfg.decode_head.c1_in_channels == SVT_B[0]  # stride-4 map, inputs[0]
    assert cfg.decode_head.in_channels == SVT_B[3]  # in_index 3
    assert cfg.auxiliary_head.in_channels == SVT_B[2]  # in_index 2


def test_fastfcn_jpu_and_the_map_it_passes_through(outdir):
    src = source_cfg(FASTFCN).model
    assert src.neck.in_channels == (512, 1024, 2048)
    cfg = converted(outdir, FASTFCN)[1].model
    assert cfg.backbone.out_indices == (1, 2, 3)
    assert cfg.neck.in_channels == tuple(SVT_B[1:])  # JPU asserts a tuple
    # JPU's outputs: backbone maps 0 and 1 unchanged, then its own (4 x 512 channels).
    assert cfg.auxiliary_head.in_index == 1 and cfg.auxiliary_head.in_channels == SVT_B[2]
    assert cfg.decode_head.in_index == 2 and cfg.decode_head.in_channels == 2048


def test_knet_kernel_generate_head(outdir):
    src = source_cfg(KNET).model.decode_head
    cfg = converted(outdir, KNET)[1].model
    assert src.kernel_generate_head.in_channels == [96, 192, 384, 768]  # Swin-T
    gen = cfg.decode_head.kernel_generate_head
    assert gen.in_channels == [96, 192, 384, 768]  # SVT-B has Swin-T's widths
    assert gen.type == 'UPerHead'
    # The kernel update heads read the generating head's maps, not the backbone's.
    assert cfg.decode_head.kernel_update_head == src.kernel_update_head
    cfg = converted(outdir, KNET, 'twins_pcpvt_s')[1].model
    assert cfg.decode_head.kernel_generate_head.in_channels == PCPVT_S
    assert cfg.auxiliary_head.in_channels == PCPVT_S[2]


@pytest.mark.parametrize('src,head', [(MASK2FORMER_SEG, 'decode_head'),
                                      (MASK2FORMER_DET, 'panoptic_head')])
def test_mask2former_head_in_channels(outdir, src, head):
    assert source_cfg(src).model[head].in_channels == [256, 512, 1024, 2048]
    cfg = converted(outdir, src)[1].model
    assert cfg[head].in_channels == SVT_B
    assert cfg[head].type == 'Mask2FormerHead'


def test_pixel_decoder_in_channels_are_rewritten_with_the_head(tmp_path):
    src = write(tmp_path / 'm2f_pd.py', f"_base_ = ['{MASK2FORMER_SEG}']\n"
                "model = dict(decode_head=dict(pixel_decoder=dict(\n"
                "    in_channels=[256, 512, 1024, 2048])))\n")
    out = tmp_path / 'out.py'
    swap_backbone(src, 'twins_svt_b', str(out))
    head = Config.fromfile(str(out)).model.decode_head
    assert head.in_channels == SVT_B and head.pixel_decoder.in_channels == SVT_B


def test_caffe_normalisation_becomes_imagenet_rgb(outdir):
    src = source_cfg(FASTER_CAFFE).model.data_preprocessor
    assert src.bgr_to_rgb is False and src.std == [1.0, 1.0, 1.0]
    dp = converted(outdir, FASTER_CAFFE)[1].model.data_preprocessor
    assert (dp.mean, dp.std, dp.bgr_to_rgb) == (IMAGENET_MEAN, IMAGENET_STD, True)
    assert dp.pad_size_divisor == src.pad_size_divisor


# ------------------------------------------------------------------ optimiser rules
def test_no_decay_keys_are_added_to_a_source_without_custom_keys(outdir):
    assert 'custom_keys' not in source_cfg(SEM_FPN).optim_wrapper.get('paramwise_cfg', {})
    keys = converted(outdir, SEM_FPN)[1].optim_wrapper.paramwise_cfg.custom_keys
    assert keys == {'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}


def test_custom_keys_merge_keeps_the_source_rules_and_applies_twins_rules(outdir):
    """Read through mmengine's own optimiser constructor on the built model: Mask2Former's
    'backbone' (lr x0.1), 'query_embed' / 'query_feat' / 'level_embed' (no decay) still
    apply, and every PEG / norm parameter of Twins gets no decay at the backbone's lr."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    src = source_cfg(MASK2FORMER_SEG)
    source_keys = src.optim_wrapper.paramwise_cfg.custom_keys
    assert set(source_keys) == {'backbone', 'query_embed', 'query_feat', 'level_embed'}
    cfg = converted(outdir, MASK2FORMER_SEG, 'twins_svt_s')[1]
    merged = cfg.optim_wrapper.paramwise_cfg.custom_keys
    for key, rule in source_keys.items():
        assert merged[key] == rule, key

    init_default_scope('mmseg')
    model_cfg = cfg.model.copy()
    model_cfg.backbone.init_cfg = None
    model = revert_sync_batchnorm(MODELS.build(model_cfg))
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    lr, wd = 1e-4, 0.05  # the source's AdamW
    assert (src.optim_wrapper.optimizer.lr, src.optim_wrapper.optimizer.weight_decay) == (lr, wd)
    checked = dict(no_decay=0, decay=0)  # backbone parameters seen
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        if name.startswith('backbone.'):
            no_decay = 'pos_block' in name or '.norm' in name
            assert group['lr'] == pytest.approx(0.1 * lr), name
            assert group['weight_decay'] == (0. if no_decay else pytest.approx(wd)), name
            checked['no_decay' if no_decay else 'decay'] += 1
        elif any(k in name for k in ('query_embed', 'query_feat', 'level_embed')):
            assert group['lr'] == pytest.approx(lr) and group['weight_decay'] == 0., name
    # SVT-S: 4 PEGs, 4 patch-embedding norms, 18 blocks x 2 norms, 7 GSA norms (stages 0-2,
    # sr > 1), 4 stage norms; weight and bias each (docs/reference.md 1.2).
    assert checked['no_decay'] == 2 * (4 + 4 + 36 + 7 + 4)


# ------------------------------------------------------------------ refusals
def test_unknown_variant(tmp_path):
    assert_refused(tmp_path, SEM_FPN, 'twins_svt_xl', '--backbone', "'twins_svt_xl'",
                   'twins_pcpvt_s', 'twins_svt_l')


def test_source_without_backbone(tmp_path):
    src = write(tmp_path / 'src' / 'no_backbone.py',
                "default_scope = 'mmseg'\n"
                "model = dict(type='EncoderDecoder', decode_head=dict(type='FCNHead'))\n")
    assert_refused(tmp_path, src, 'twins_svt_b', 'has no model.backbone',
                   'no backbone to replace')


def test_missing_source(tmp_path):
    assert_refused(tmp_path, 'mmseg::sem_fpn/no_such_config.py', 'twins_svt_b',
                   'no such config in the installed mmseg')
    assert_refused(tmp_path, str(tmp_path / 'nowhere.py'), 'twins_svt_b', 'no such file')


def test_dilated_resnet_needs_an_explicit_choice(tmp_path):
    message = assert_refused(tmp_path, DEEPLABV3PLUS, 'twins_svt_b',
                             'model.backbone.dilations=(1, 1, 2, 4)', 'strides 4, 8, 8, 8',
                             '--allow-stride-change', '-d32')
    assert 'strides=(1, 2, 1, 1)' in message


def test_dc5_detector_is_refused(tmp_path):
    assert_refused(tmp_path, 'mmdet::faster_rcnn/faster-rcnn_r50-caffe-dc5_1x_coco.py',
                   'twins_svt_b', 'model.backbone.dilations=(1, 1, 1, 2)', 'strides 16',
                   '--allow-stride-change')


def test_level_beyond_twins_stages(tmp_path):
    # CSPDarknet P6: a fourth map at stride 64, which Twins does not have.
    src = write(tmp_path / 'src' / 'yolox_p6.py',
                f"_base_ = ['{YOLOX}']\n"
                "model = dict(backbone=dict(arch='P6', out_indices=(2, 3, 4, 5)),\n"
                "             neck=dict(in_channels=[96, 192, 384, 384]))\n")
    assert_refused(tmp_path, src, 'twins_svt_b', 'model.backbone.out_indices=(2, 3, 4, 5)',
                   'stride 64', 'Drop that level')


def test_head_reading_a_map_the_backbone_does_not_give(tmp_path):
    src = write(tmp_path / 'src' / 'fastfcn_idx.py',
                f"_base_ = ['{KNET}']\nmodel = dict(auxiliary_head=dict(in_index=4))\n")
    assert_refused(tmp_path, src, 'twins_svt_b', 'model.auxiliary_head.in_index=4',
                   'the backbone feeds 4 maps')


def test_channel_key_that_does_not_match_the_backbone(tmp_path):
    src = write(tmp_path / 'src' / 'fpn_odd.py',
                f"_base_ = ['{SEM_FPN}']\n"
                "model = dict(neck=dict(in_channels=[256, 512, 1024, 1024]))\n")
    assert_refused(tmp_path, src, 'twins_svt_b', 'model.neck.in_channels is 1024',
                   'map 3', '2048 channels', 'by hand')


def test_unknown_channel_key(tmp_path):
    src = write(tmp_path / 'src' / 'odd_key.py',
                f"_base_ = ['{KNET}']\n"
                "model = dict(auxiliary_head=dict(skip_in_channels=96))\n")
    assert_refused(tmp_path, src, 'twins_svt_b', 'model.auxiliary_head.skip_in_channels',
                   'by hand')


def test_c4_detector_is_refused(tmp_path):
    assert_refused(tmp_path, FASTER_C4, 'twins_svt_b', 'model.roi_head', 'shared_head',
                   'FPN version')


def test_layer_decay_constructor_is_refused(tmp_path):
    src = write(tmp_path / 'src' / 'layer_decay.py',
                f"_base_ = ['{SEM_FPN}']\n"
                "optim_wrapper = dict(constructor='LearningRateDecayOptimizerConstructor',\n"
                "                     paramwise_cfg=dict(decay_rate=0.9, num_layers=12))\n")
    assert_refused(tmp_path, src, 'twins_svt_b',
                   "optim_wrapper.constructor='LearningRateDecayOptimizerConstructor'",
                   'Remove it')


def test_failed_conversion_leaves_an_existing_output_as_it_was(tmp_path):
    out = tmp_path / 'out' / 'keep.py'
    write(out, 'previous = 1\n')
    with pytest.raises(SwapError):
        swap_backbone(DEEPLABV3PLUS, 'twins_svt_b', str(out))
    assert out.read_text() == 'previous = 1\n'
    assert os.listdir(out.parent) == ['keep.py']


def test_output_is_not_written_when_it_does_not_read_back(tmp_path, monkeypatch):
    """The file is written to a temporary name, read back by mmengine, then renamed: a
    failure on the way leaves neither a partial file nor the temporary one."""
    from twins_mm import swap
    fromfile = Config.fromfile

    def unreadable_output(path, *args, **kwargs):
        if osp.basename(path).startswith('.swap_backbone_'):  # the file being written
            raise SyntaxError(f'cannot read {path}')
        return fromfile(path, *args, **kwargs)

    out = tmp_path / 'out' / 'partial.py'
    monkeypatch.setattr(swap.Config, 'fromfile', unreadable_output)
    with pytest.raises(SyntaxError, match='cannot read .*swap_backbone_'):
        swap.swap_backbone(SEM_FPN, 'twins_svt_b', str(out))
    assert os.listdir(out.parent) == []


# ------------------------------------------------------------------ command line
def test_cli_error_exits_non_zero_with_the_message(tmp_path, capsys):
    out = tmp_path / 'cli.py'
    with pytest.raises(SystemExit) as exit_:
        cli.main([DEEPLABV3PLUS, '--backbone', 'twins_svt_b', '--out', str(out)])
    assert isinstance(exit_.value.code, str)  # sys.exit(message): status 1, message on stderr
    assert exit_.value.code.startswith('error: model.backbone.dilations=')
    assert not out.exists()


def test_cli_writes_the_config(tmp_path, capsys):
    out = tmp_path / 'cli.py'
    cli.main([DEEPLABV3PLUS, '--backbone', 'twins_svt_b', '--out', str(out),
              '--allow-stride-change'])
    printed = capsys.readouterr().out
    assert printed.startswith(f'wrote {out} (inherits {DEEPLABV3PLUS}):')
    cfg = Config.fromfile(str(out))
    assert cfg.model.decode_head.c1_in_channels == SVT_B[0]
    assert osp.isfile(out)
