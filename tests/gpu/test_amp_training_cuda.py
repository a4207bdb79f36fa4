"""GPU tier: short mixed-precision training of real configs through mmengine on CUDA.

The same runs as tests/e2e/test_e2e_amp.py, with nothing bypassed: ``tools/train.py --amp``
(mmengine's AmpOptimWrapper, dynamic loss scale, fp16) on the Semantic FPN and RetinaNet
Twins-SVT-S configs, and the Mask R-CNN 3x config with its own wrapper (AmpOptimWrapper,
static loss scale 512, fp16), on demo data, each against an fp32 run of the same seed,
weights and data. These need mmseg and mmdet, and the detection runs mmcv's CUDA ops (NMS,
RoIAlign): where a package does not import the tests are skipped with the import error, and
where mmcv was built without CUDA ops (it imports, then fails on the first CUDA tensor) the
detection tests are skipped with that reason (``tests/gpu/common.py``).

Bounds (not yet calibrated on a GPU; the CPU bf16 runs of tests/e2e/test_e2e_amp.py measured
loss differences <= 2.3e-3 and update cosines >= 0.948): every loss finite; FPN and
RetinaNet: the total loss of every iteration within ``LOSS_RTOL`` = 1% (relative) of fp32
and the cosine similarity of the backbone's weight updates to fp32's >= ``UPDATE_COS`` = 0.9.
Mask R-CNN's RoI sampling depends on which proposals survive NMS, which fp16 scores may
reorder: there the RPN losses of every iteration are held to 1% and the total loss of the
first iteration (same weights) to 10%.
"""
import pytest
import torch

from tests.gpu.amp_training import (MASK_RCNN_3X_CONFIG, RETINANET_CONFIG, SEG_CONFIG,
                                    det_options, make_coco_workspace, make_seg_workspace,
                                    relative_differences, run_train, seg_options,
                                    update_agreement)
from tests.gpu.common import skip_without_mmcv_cuda_ops

pytestmark = pytest.mark.cuda

LOSS_RTOL = 1e-2
UPDATE_COS = 0.9
MASK_RCNN_FIRST_LOSS_RTOL = 0.10


@pytest.fixture(autouse=True)
def openmmlab():
    try:
        import mmcv.ops  # noqa: F401
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
    except Exception as e:  # ImportError, or a compiled-ops load error
        pytest.skip(f'needs mmcv with compiled ops, mmseg and mmdet ({type(e).__name__}: '
                    f'{e}); install them (make install) to run the training tier')


def _check(amp, fp32, dtype, rtol=LOSS_RTOL):
    assert set(amp.probe.autocast) == {(True, dtype)}, amp.probe.autocast
    assert amp.probe.compute_dtypes() == {dtype}
    assert fp32.probe.compute_dtypes() == {torch.float32}
    assert amp.finite and fp32.finite, (amp.losses, fp32.losses)
    assert len(amp.losses) == len(fp32.losses) > 0
    if rtol is not None:
        rel = relative_differences(amp.losses, fp32.losses)
        assert max(rel) <= rtol, (amp.losses, fp32.losses, rel)
        agreement = update_agreement(amp, fp32)
        assert agreement >= UPDATE_COS, f'backbone updates: cosine {agreement:.4f} vs fp32'


def test_segmentation_amp_flag_fp16(tmp_path):
    from mmengine.optim import AmpOptimWrapper
    ws = make_seg_workspace(str(tmp_path), size=128)
    opts = seg_options(ws, iters=4)
    fp32 = run_train(SEG_CONFIG, str(tmp_path / 'fp32'), opts)
    amp = run_train(SEG_CONFIG, str(tmp_path / 'amp'), opts, amp=True)
    assert isinstance(amp.wrapper, AmpOptimWrapper)
    assert amp.wrapper.loss_scaler.is_enabled()
    _check(amp, fp32, torch.float16)


def test_retinanet_amp_flag_fp16(tmp_path):
    skip_without_mmcv_cuda_ops()
    ws = make_coco_workspace(str(tmp_path), num_train=8, size=(320, 256))
    opts = det_options(ws, epochs=1)
    fp32 = run_train(RETINANET_CONFIG, str(tmp_path / 'fp32'), opts)
    amp = run_train(RETINANET_CONFIG, str(tmp_path / 'amp'), opts, amp=True)
    assert amp.wrapper.loss_scaler.is_enabled()
    _check(amp, fp32, torch.float16)


def test_mask_rcnn_3x_own_amp_wrapper_fp16(tmp_path):
    """The config's own settings: AmpOptimWrapper, loss_scale=512 (static), default dtype
    (fp16 on CUDA), multi-scale train pipeline. The fp32 run is the same wrapper with
    ``optim_wrapper.dtype=float32`` (torch then disables CUDA autocast; the static scale of
    512 is a power of two, so scaling and unscaling are exact)."""
    skip_without_mmcv_cuda_ops()
    from mmengine.optim import AmpOptimWrapper
    ws = make_coco_workspace(str(tmp_path), num_train=8, size=(320, 256))
    opts = det_options(ws, epochs=1, resize=False)
    amp = run_train(MASK_RCNN_3X_CONFIG, str(tmp_path / 'amp'), opts)
    fp32 = run_train(MASK_RCNN_3X_CONFIG, str(tmp_path / 'fp32'),
                     opts + ['optim_wrapper.dtype=float32'])
    assert type(amp.wrapper) is AmpOptimWrapper and amp.wrapper.cast_dtype is None
    assert amp.wrapper.loss_scaler.get_scale() == 512.  # static scale, kept by update(512.)
    assert not any(enabled for enabled, _ in fp32.probe.autocast)
    _check(amp, fp32, torch.float16, rtol=None)
    first = relative_differences(amp.losses[:1], fp32.losses[:1])[0]
    assert first <= MASK_RCNN_FIRST_LOSS_RTOL, (amp.losses, fp32.losses)
    for key in ('loss_rpn_cls', 'loss_rpn_bbox'):
        rel = relative_differences(amp.logs[key], fp32.logs[key])
        assert max(rel) <= LOSS_RTOL, (key, amp.logs[key], fp32.logs[key])
