"""End to end: mixed-precision training through mmengine's own AmpOptimWrapper, on CPU (bf16).

``tools/train.py --amp`` on a real segmentation config and AMP on a real RetinaNet config run
a few iterations on demo data, in this process. The only thing changed for the CPU is the
answer to "is a GPU present?" (``tools/train.py``'s ``amp_device_available`` and the
``is_cuda_available`` that ``AmpOptimWrapper.__init__`` asserts on; see
``tests/gpu/amp_training.py``): the wrapper, mmengine's autocast, the model and the configs
are those that run on a GPU. On CPU mmengine's autocast computes in bfloat16.

Each AMP run is compared with an fp32 run (plain ``OptimWrapper``) of the same config, seed,
weights and data: every iteration's loss must be finite and within ``LOSS_RTOL`` (relative) of
the fp32 loss, the wrapper must be an AmpOptimWrapper, and hooks on the backbone must see
autocast on, in bfloat16, with every convolution, matmul and attention kernel of the backbone
fed bfloat16 (float32 in the fp32 run). The wrapper's GradScaler runs on the CPU's tensors
(``torch.amp.GradScaler('cpu')``; mmengine builds the CUDA one, which switches itself off
without a GPU), so the loss really is scaled: the backbone gradient that the optimizer's first
step receives must be the fp32 run's within ``GRAD_COS`` / ``GRAD_NORM_RTOL``, i.e. unscaled.

Mask R-CNN under CPU autocast stops in mmcv's CPU ``nms`` (no bf16 kernel; mmcv's, not ours),
so for the 3x configs this file checks the wrapper mmengine builds from the config's own
settings and one step of it on the backbone and neck; whole Mask R-CNN AMP training is in the
GPU tier (tests/gpu/test_amp_training_cuda.py).
"""
import math

import pytest
import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from tests.gpu.amp_training import (MASK_RCNN_3X_CONFIG, REPO, RETINANET_CONFIG, SEG_CONFIG,
                                    AMP_WRAPPER_MODULE, BackboneProbe, cpu_grad_scaler,
                                    det_options, gradient_agreement, make_coco_workspace,
                                    make_seg_workspace, relative_differences, run_train,
                                    seg_options, update_agreement)

SEG_ITERS = 3
# Loss of every iteration, relative to the fp32 run. Measured here: Semantic FPN <= 5.4e-4,
# RetinaNet <= 2.4e-3 (the randomly initialised heads make these losses depend
# weakly on the backbone's rounding, hence the small differences).
LOSS_RTOL = 1e-2
# The weight updates of the whole backbone over the run, AMP vs fp32 (cosine similarity of
# the concatenated final-minus-initial weights). AdamW's first steps move every weight by
# about lr whatever the size of its gradient, so bf16 noise on the near-zero gradients
# (e.g. the key biases, which softmax ignores) shows; measured 0.944 (FPN) and
# 0.980 (RetinaNet). A backbone stage without gradient, or gradients of the wrong
# sign or scale pattern, would pull it far lower.
UPDATE_COS = 0.9
# The whole backbone gradient at the first optimizer step (same weights, data and draws),
# AMP vs fp32: cosine and norm ratio. Measured: cosine 0.994 (FPN) and 0.993 (RetinaNet),
# norm ratio 0.993 and 0.987. An optimizer step that received the scaled gradient (65536
# times too large) or a gradient of the wrong sign or pattern fails by far.
GRAD_COS = 0.98
GRAD_NORM_RTOL = 0.05
DYNAMIC_INITIAL_SCALE = 2. ** 16  # torch's GradScaler default, halved at any inf/NaN
# The kernels that do the backbone's arithmetic: convolutions (patch embeddings, PEG,
# sub-sampling), the linear layers (addmm) and attention.
BACKBONE_KERNELS = {'convolution', 'addmm', '_scaled_dot_product_flash_attention_for_cpu'}


def _check_kernels(run, dtype):
    kernels = run.probe.kernel_dtypes()
    assert BACKBONE_KERNELS <= set(kernels), sorted(kernels)
    wrong = {op: dtypes for op, dtypes in kernels.items() if dtypes != {dtype}}
    assert not wrong, f'backbone kernels not fed {dtype}: {wrong}'


def _check_amp_run(amp, fp32, iters, cast_dtype):
    assert isinstance(amp.wrapper, AmpOptimWrapper), type(amp.wrapper)
    assert amp.wrapper.cast_dtype == cast_dtype
    assert type(fp32.wrapper) is OptimWrapper, type(fp32.wrapper)
    # The backbone ran under autocast in bf16 in every training forward, and not in fp32.
    assert len(amp.probe.autocast) == iters
    assert set(amp.probe.autocast) == {(True, torch.bfloat16)}, amp.probe.autocast
    assert amp.probe.compute_dtypes() == {torch.bfloat16}
    _check_kernels(amp, torch.bfloat16)
    assert not any(enabled for enabled, _ in fp32.probe.autocast)
    assert fp32.probe.compute_dtypes() == {torch.float32}
    _check_kernels(fp32, torch.float32)
    # The scaler scaled the loss (dynamic scale, no inf/NaN met) and the optimizer's first
    # step received the unscaled gradient, the fp32 run's within bf16's rounding.
    scaler = amp.wrapper.loss_scaler
    assert scaler.is_enabled() and scaler.get_scale() == DYNAMIC_INITIAL_SCALE
    cos, ratio = gradient_agreement(amp, fp32)
    assert cos >= GRAD_COS and abs(ratio - 1) <= GRAD_NORM_RTOL, (cos, ratio)
    assert len(amp.losses) == len(fp32.losses) == iters
    assert amp.finite and fp32.finite, (amp.losses, fp32.losses)
    rel = relative_differences(amp.losses, fp32.losses)
    assert max(rel) <= LOSS_RTOL, (
        f'bf16 losses {amp.losses} vs fp32 {fp32.losses}: relative differences {rel} '
        f'(bound {LOSS_RTOL})')
    # Not the same numbers: autocast really changed the arithmetic.
    assert amp.losses != fp32.losses
    agreement = update_agreement(amp, fp32)
    assert agreement >= UPDATE_COS, f'backbone updates: cosine {agreement:.4f} vs fp32'
    print(f'losses fp32 {fp32.losses} bf16 {amp.losses} relative differences {rel}; '
          f'first-step gradient cosine {cos:.5f}, norm ratio {ratio:.5f}; '
          f'backbone update cosine {agreement:.4f}')


def test_segmentation_amp_flag_bf16_matches_fp32(tmp_path, monkeypatch):
    """``tools/train.py configs/fpn_twins_svt_s_80k.py --amp``: Semantic FPN, Twins-SVT-S
    with the config's stochastic depth 0.2 and head dropout 0.1, 64x64 crops, batch 2, three
    iterations. --amp leaves the dtype to mmengine (fp16 on a GPU, bf16 on CPU)."""
    ws = make_seg_workspace(str(tmp_path))
    opts = seg_options(ws, SEG_ITERS)
    fp32 = run_train(SEG_CONFIG, str(tmp_path / 'fp32'), opts, monkeypatch=monkeypatch)
    amp = run_train(SEG_CONFIG, str(tmp_path / 'amp'), opts, amp=True,
                    monkeypatch=monkeypatch, gpu_checks_pass=True, cpu_scaler=True)
    _check_amp_run(amp, fp32, SEG_ITERS, cast_dtype=None)


def test_retinanet_amp_bf16_matches_fp32(tmp_path, monkeypatch):
    """``tools/train.py configs/retinanet_twins_svt_s_1x.py --amp --cfg-options
    optim_wrapper.dtype=bfloat16``: RetinaNet, Twins-SVT-S with the config's stochastic
    depth 0.2 and random flip, 128x96 demo COCO, batch 2, one epoch of two iterations."""
    ws = make_coco_workspace(str(tmp_path), num_train=4)
    opts = det_options(ws, epochs=1)
    fp32 = run_train(RETINANET_CONFIG, str(tmp_path / 'fp32'), opts, monkeypatch=monkeypatch)
    amp = run_train(RETINANET_CONFIG, str(tmp_path / 'amp'),
                    opts + ['optim_wrapper.dtype=bfloat16'], amp=True,
                    monkeypatch=monkeypatch, gpu_checks_pass=True, cpu_scaler=True)
    _check_amp_run(amp, fp32, 2, cast_dtype=torch.bfloat16)
    # The components of the loss, not only their sum.
    for key in ('loss_cls', 'loss_bbox'):
        rel = relative_differences(amp.logs[key], fp32.logs[key])
        assert max(rel) <= LOSS_RTOL, (key, amp.logs[key], fp32.logs[key])


@pytest.mark.parametrize('family', ['svt', 'pcpvt'])
def test_mask_rcnn_3x_builds_its_own_amp_wrapper(family, monkeypatch):
    """The official fp16 recipe of the Mask R-CNN 3x configs: mmengine builds an
    AmpOptimWrapper with a static loss scale of 512 and no dtype (the device's autocast
    default: fp16 on CUDA, bf16 on CPU), around AdamW with the config's paramwise rules. One
    step of it on the backbone and neck runs under autocast in bf16, its backward produces
    exactly 512 times the unscaled autocast gradient (512 is a power of two), the optimizer
    step receives exactly the unscaled one, the scale stays 512, and the weights move by
    AdamW's first step."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    config = MASK_RCNN_3X_CONFIG.replace('svt_s', f'{family}_s')
    cfg = Config.fromfile(f'{REPO}/{config}')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 512.
    assert 'dtype' not in cfg.optim_wrapper

    from mmdet.registry import MODELS
    cfg.model.backbone.init_cfg = None  # no download; the weights do not matter here
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    import importlib
    monkeypatch.setattr(importlib.import_module(AMP_WRAPPER_MODULE), 'is_cuda_available',
                        lambda: True)
    cpu_grad_scaler(monkeypatch)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(wrapper) is AmpOptimWrapper
    assert wrapper._scale_update_param == 512.  # static: update() resets the scale to 512
    assert wrapper.cast_dtype is None
    assert isinstance(wrapper.loss_scaler, torch.amp.GradScaler)
    assert wrapper.loss_scaler.is_enabled() and wrapper.loss_scaler.get_scale() == 512.
    optimizer = wrapper.optimizer
    assert type(optimizer) is torch.optim.AdamW
    # paramwise_cfg: no weight decay on the PEG convs and the norms, 0.05 elsewhere.
    names = {id(p): n for n, p in model.named_parameters()}
    decays = {}
    for group in optimizer.param_groups:
        assert group['lr'] == 1e-4
        for p in group['params']:
            decays[names[id(p)]] = group['weight_decay']
    assert decays['backbone.pos_block.0.proj.0.weight'] == 0.
    assert decays['backbone.blocks.0.0.norm1.weight'] == 0.
    assert decays['backbone.blocks.0.0.mlp.fc1.weight'] == 0.05

    model.train()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))

    def loss_of_features():
        torch.manual_seed(0)  # the same stochastic-depth draws in every pass
        feats = model.extract_feat(images)
        return sum(f.float().pow(2).mean() for f in feats)

    # The reference: the same autocast pass, unscaled (what a correct step must receive).
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss_of_features().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert any(n.startswith('backbone.') for n, _ in trained)
    unscaled = {n: p.grad.clone() for n, p in trained}
    model.zero_grad(set_to_none=True)

    probe = BackboneProbe(model.backbone, 'cpu')
    before = model.backbone.patch_embeds[0].proj.weight.detach().clone()
    after_backward, at_step = {}, {}
    hooks = [p.register_post_accumulate_grad_hook(
        lambda p, n=n: after_backward.__setitem__(n, p.grad.clone())) for n, p in trained]
    hooks.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: at_step.update(
        {n: p.grad.clone() for n, p in trained})))
    with wrapper.optim_context(model):
        loss = loss_of_features()
    assert math.isfinite(loss.item())
    wrapper.update_params(loss)
    for h in hooks:
        h.remove()
    assert after_backward.keys() == at_step.keys() == unscaled.keys()
    for n in unscaled:
        torch.testing.assert_close(after_backward[n], 512. * unscaled[n], rtol=0, atol=0,
                                   msg=n)
        torch.testing.assert_close(at_step[n], unscaled[n], rtol=0, atol=0, msg=n)
    assert wrapper.loss_scaler.get_scale() == 512.
    assert probe.autocast == [(True, torch.bfloat16)]
    assert probe.compute_dtypes() == {torch.bfloat16}
    after = model.backbone.patch_embeds[0].proj.weight.detach()
    assert torch.isfinite(after).all()
    # AdamW's first step moves every weight with a non-zero gradient by about lr.
    step = (after - before * (1 - 1e-4 * 0.05)).abs()
    assert step.max() <= 1.01e-4 and step.median() >= 0.5e-4, (step.max(), step.median())
