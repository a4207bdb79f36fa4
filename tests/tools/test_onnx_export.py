"""ONNX export with dynamic H and W: onnxruntime equals PyTorch at sizes unseen at export.

The models are small custom archs (every Twins block kind, four stages) so that the
dynamo export stays quick; the export code path is the one the presets use. Sizes:
224x448 makes every stage map whole 7x7 windows (no padding in eager), 100x164 needs
right and bottom padding at every stage (and 25x41 at stride 4 pads both sides).
"""
import os
import sys

import pytest
import torch

import twins_mm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tools', 'deployment'))
sys.path.insert(0, os.path.join(REPO, 'tools', 'analysis_tools'))

import pytorch2onnx  # noqa: E402

TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])
UNSEEN = [(224, 448), (100, 164)]  # exported at 96x128


def randomise(model):
    """Non-trivial norms and biases, so a wrong pad, mask or crop shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def test_sizes_cover_padding_and_whole_windows():
    def stage_sides(h):
        sides = [h // 4]
        for _ in range(3):
            sides.append(sides[-1] // 2)
        return sides
    whole, padded = UNSEEN
    assert all(s % 7 == 0 for s in stage_sides(whole[0]) + stage_sides(whole[1]))
    assert all(s % 7 for s in stage_sides(padded[0]) + stage_sides(padded[1]))


@pytest.mark.parametrize('opset', [18, 23])  # MatMul + Softmax chain / one Attention node
def test_backbone_round_trip(tmp_path, opset):
    model = randomise(twins_mm.TwinsSVT(TINY_SVT))
    path = pytorch2onnx.export_onnx(model, torch.randn(2, 3, 96, 128), str(tmp_path / 'b.onnx'),
                                    opset=opset)
    import onnx
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ('Attention' in ops) == (opset >= 23)
    worst = pytorch2onnx.check_onnx(model, path, UNSEEN, batch=1, atol=1e-4)
    assert worst <= 1e-4


def test_whole_segmentor_round_trip(tmp_path):
    cfg = os.path.join(REPO, 'configs', 'fpn_twins_svt_s_80k.py')
    model = pytorch2onnx.build_segmentor(cfg, cfg_options={
        'model.backbone.arch': dict(_delete_=True, **TINY_SVT),
        'model.neck.in_channels': TINY_SVT['embed_dims'],
        'model.neck.out_channels': 16, 'model.decode_head.in_channels': [16] * 4,
        'model.decode_head.channels': 16})
    randomise(model)
    path = pytorch2onnx.export_onnx(model, torch.randn(2, 3, 96, 128), str(tmp_path / 's.onnx'))
    worst = pytorch2onnx.check_onnx(model, path, UNSEEN, batch=1, atol=1e-4)
    assert worst <= 1e-4


def test_segmentor_export_refuses_a_detector():
    cfg = os.path.join(REPO, 'configs', 'retinanet_twins_svt_s_1x.py')
    with pytest.raises(SystemExit, match='not a segmentation model'):
        pytorch2onnx.build_segmentor(cfg)


def test_onnx_latency_reports_both_runtimes():
    import benchmark
    model = randomise(twins_mm.TwinsSVT(TINY_SVT))
    args = benchmark.parse_args(['--threads', '1', '--runs', '1', '--warmup', '0'])
    x = torch.randn(1, 3, 64, 96)
    onnx_ms, eager_ms = benchmark.onnx_latency(model, x, args, benchmark.infer_fn(model, x))
    assert onnx_ms > 0 and eager_ms > 0
