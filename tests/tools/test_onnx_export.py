"""ONNX export with dynamic H and W: onnxruntime equals PyTorch at sizes unseen at export.

The models are small custom archs (every Twins block kind, four stages) so that the
dynamo export stays quick; the export code path is the one the presets use. Sizes:
224x448 makes every stage map whole 7x7 windows (no padding in eager), 100x164 needs
right and bottom padding at every stage (and 25x41 at stride 4 pads both sides).
"""
import os
import statistics
import sys

import numpy as np
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


def test_onnx_latency_times_the_exported_model_on_the_input(monkeypatch):
    """benchmark.onnx_latency must time an ONNX model that computes what the eager model
    computes, on the given input, and report milliseconds of the calls it timed.

    Every onnxruntime session run and every eager run is intercepted: the ONNX outputs are
    compared with the eager model's, and the reported medians with the calls' own times."""
    import time

    import benchmark
    import onnxruntime as ort

    model = randomise(twins_mm.TwinsSVT(TINY_SVT))
    x = torch.randn(1, 3, 64, 96)  # not the export size, and padding at every stage
    onnx_calls, eager_calls = [], []

    class RecordingSession(ort.InferenceSession):
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            outs = super().run(*args, **kwargs)
            onnx_calls.append((time.perf_counter() - t0, outs, args[1]))
            return outs

    monkeypatch.setattr(ort, 'InferenceSession', RecordingSession)
    eager = benchmark.infer_fn(model, x)

    def timed_eager():
        t0 = time.perf_counter()
        eager()
        eager_calls.append(time.perf_counter() - t0)

    runs, warmup = 3, 1
    args = benchmark.parse_args(['--threads', '1', '--runs', str(runs),
                                 '--warmup', str(warmup)])
    onnx_ms, eager_ms = benchmark.onnx_latency(model, x, args, timed_eager)

    assert len(onnx_calls) == len(eager_calls) == runs + warmup
    with torch.inference_mode():
        expected = model(x)
    for _, outs, feed in onnx_calls:
        [fed] = feed.values()
        assert np.array_equal(fed, x.numpy())
        assert len(outs) == len(expected)
        for o, e in zip(outs, expected):
            torch.testing.assert_close(torch.from_numpy(o), e, rtol=1e-4, atol=1e-4)

    # Each reported median encloses the timed calls themselves (warm-up excluded): not
    # seconds (1000x smaller), not a sum, not a different set of calls.
    for reported, inner in ((onnx_ms, [c[0] for c in onnx_calls]), (eager_ms, eager_calls)):
        inner_ms = statistics.median(inner[warmup:]) * 1e3
        assert inner_ms <= reported <= 1.5 * inner_ms + 20, (reported, inner_ms)
