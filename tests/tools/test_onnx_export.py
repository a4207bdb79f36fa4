"""ONNX export with dynamic H and W: onnxruntime equals PyTorch at sizes unseen at export.

The models are small custom archs (every Twins block kind, four stages) so that the
dynamo export stays quick; the export code path is the one the presets use. Sizes:
224x448 makes every stage map whole 7x7 windows (no padding in eager), 100x164 needs
right and bottom padding at every stage (and 25x41 at stride 4 pads both sides).
Graphs are exported from a padded example (96x128) and from a whole-window one (224x224,
the usual dummy input); each must serve both kinds of size.
"""
import os
import statistics
import subprocess
import sys
import textwrap

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


@pytest.mark.parametrize('opset,example', [
    (18, (96, 128)),   # MatMul + Softmax chain; every stage map padded while tracing
    # One Attention node; 224x224 gives stage maps of 56, 28, 14 and 7 tokens: whole
    # windows, nothing padded while tracing (the usual dummy input). The graph must still
    # pad and mask at the padded size 100x164.
    (23, (224, 224)),
], ids=['opset18-padded-example', 'opset23-whole-window-example'])
def test_backbone_round_trip(tmp_path, opset, example):
    model = randomise(twins_mm.TwinsSVT(TINY_SVT))
    path = pytorch2onnx.export_onnx(model, torch.randn(2, 3, *example),
                                    str(tmp_path / 'b.onnx'), opset=opset)
    import onnx
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ('Attention' in ops) == (opset >= 23)
    worst = pytorch2onnx.check_onnx(model, path, UNSEEN, batch=1, atol=1e-4)
    assert worst <= 1e-4


def test_segmentor_export_refuses_a_detector():
    cfg = os.path.join(REPO, 'configs', 'retinanet_twins_svt_s_1x.py')
    with pytest.raises(SystemExit, match='not a segmentation model'):
        pytorch2onnx.build_segmentor(cfg)


def test_onnx_latency_times_the_exported_model_on_the_input(monkeypatch):
    """benchmark.onnx_latency must time an ONNX model that computes what the eager model
    computes, on the given input, and report milliseconds of the calls it timed.

    Every onnxruntime run and every eager run is intercepted: the ONNX outputs are
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


# --------------------------------------------------------------------------- the CLI
TOOL = os.path.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')


def tiny_segmentor_config(tmp_path):
    """A config file as a user writes one: the FPN config with a tiny backbone and heads."""
    path = tmp_path / 'tiny_fpn.py'
    path.write_text(textwrap.dedent(f"""\
        _base_ = [{os.path.join(REPO, 'configs', 'fpn_twins_svt_s_80k.py')!r}]
        model = dict(
            backbone=dict(arch=dict(_delete_=True, **{TINY_SVT!r}), init_cfg=None),
            neck=dict(in_channels={TINY_SVT['embed_dims']!r}, out_channels=16),
            decode_head=dict(in_channels=[16] * 4, channels=16))
        """))
    return str(path)


def run_tool(*args, cwd=None):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


def test_cli_exports_a_trained_segmentor_that_runs_at_other_sizes(tmp_path):
    """The CLI in a subprocess, as a user runs it: a config file and a checkpoint in, an ONNX
    file out that computes what the checkpoint's model computes. Traced at whole windows
    (224x224); the tool checks a whole-window and a padded size, this test one more that
    the tool neither traced nor checked. mmseg's float-scale upsampling must have been made
    symbolic, or the graph keeps the example's feature sizes."""
    config = tiny_segmentor_config(tmp_path)
    model = randomise(pytorch2onnx.build_segmentor(config))
    ckpt = tmp_path / 'trained.pth'
    torch.save({'state_dict': model.segmentor.state_dict(), 'meta': {}}, ckpt)
    out = tmp_path / 'seg.onnx'
    run = run_tool('--config', config, '--checkpoint', str(ckpt), '--out', str(out),
                   '--shape', '224', '224', '--check-sizes', '224', '448', '100', '164')
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'wrote {out}' in run.stdout and 'at 224x448, 100x164' in run.stdout

    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, 72, 120)
    [logits] = sess.run(None, {'image': x.numpy()})
    with torch.inference_mode():
        expected = model(x)
    assert logits.shape == (1, 150, 72, 120)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    # the checkpoint's weights, not the config's fresh initialisation
    fresh = pytorch2onnx.build_segmentor(config)
    with torch.inference_mode():
        assert (fresh(x) - expected).abs().max() > 1e-2


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    """A segmentor checkpoint must fit the config's model exactly (mmengine's default
    strict=False load would export random weights for every missing key)."""
    config = tiny_segmentor_config(tmp_path)
    ckpt = tmp_path / 'other.pth'
    other = twins_mm.TwinsSVT(dict(TINY_SVT, embed_dims=[16, 32, 64, 64]))
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in other.state_dict().items()}},
               ckpt)
    out = tmp_path / 'seg.onnx'
    with pytest.raises(SystemExit) as exit_:
        pytorch2onnx.main(['--config', config, '--checkpoint', str(ckpt), '--out', str(out)])
    message = str(exit_.value.code)
    assert message.startswith(f'error: {ckpt} does not fit the model of {config}: ')
    assert '\n' not in message
    assert 'shape mismatches: backbone.' in message and 'missing keys: neck.' in message
    assert not out.exists()


def test_cli_backbone_checkpoint_of_another_variant_is_named(tmp_path):
    ckpt = tmp_path / 'tiny_svt.pth'
    torch.save(twins_mm.TwinsSVT(TINY_SVT).state_dict(), ckpt)
    out = tmp_path / 'b.onnx'
    with pytest.raises(SystemExit) as exit_:
        pytorch2onnx.main(['--arch', 'svt-s', '--checkpoint', str(ckpt), '--out', str(out)])
    message = str(exit_.value.code)
    assert message.startswith('error: Checkpoint of another variant')
    assert 'model is TwinsSVT-small' in message and 'holds TwinsSVT-custom' in message
    assert not out.exists()


@pytest.mark.parametrize('argv,message', [
    (['--arch', 'svt-s'], 'the following arguments are required: --out'),
    (['--out', 'x.onnx'], 'one of the arguments --arch --config is required'),
    (['--arch', 'svt-s', '--config', 'c.py', '--out', 'x.onnx'], 'not allowed with'),
    (['--arch', 'svt-x', '--out', 'x.onnx'], "invalid choice: 'svt-x'"),
    (['--arch', 'svt-s', '--out', 'x.onnx', '--check-sizes', '224', '224', '200'],
     '--check-sizes takes pairs'),
    (['--arch', 'svt-s', '--out', 'x.onnx', '--shape', '31', '64'], 'at least 32'),
    (['--arch', 'svt-s', '--out', 'x.onnx', '--check-sizes', '64', '16'], 'at least 32'),
    (['--arch', 'svt-s', '--out', 'x.onnx', '--checkpoint', 'missing.pth'],
     '--checkpoint missing.pth does not exist'),
    (['--config', 'missing.py', '--out', 'x.onnx'], '--config missing.py does not exist'),
    (['--arch', 'svt-s', '--out', 'no/such/folder/x.onnx'], 'does not exist; create it'),
])
def test_cli_bad_arguments_are_named(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        pytorch2onnx.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
