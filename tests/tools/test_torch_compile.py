"""The opt-in ``compile`` flag: one graph (no breaks), the eager outputs and gradients,
dynamic shapes for multi-scale training, copies that run their own weights.

A small custom SVT has every block kind (LSA with padding and mask, GSA with and without
sub-sampling, PEG, stage norms). These tests compile with the 'aot_eager' backend: the same
Dynamo graph and AOTAutograd decomposition that inductor receives, without inductor's C++
code generation, so a four-stage model and eleven sizes stay affordable. Inductor itself,
by every route (this flag, ``torch.compile(model)``, mmengine's ``Runner(compile=...)``), is
tested in test_compile_routes.py.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import twins_mm

TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo keeps state per code object across models (the sizes it has seen decide
    whether its next compilation is dynamic): each test starts as a fresh process would,
    so a count of compilations does not depend on which tests ran before it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_forward_has_no_graph_breaks():
    model = twins_mm.TwinsSVT(TINY_SVT).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model._forward)(torch.randn(1, 3, 100, 164))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_outputs_equal_eager():
    torch.manual_seed(0)
    eager = twins_mm.TwinsSVT(TINY_SVT).eval()
    compiled = twins_mm.TwinsSVT(TINY_SVT, compile=dict(backend='aot_eager')).eval()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 100, 164)  # every stage map needs window padding
    with torch.no_grad():
        for a, b in zip(compiled(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert compiled._compiled_forward is not None


def test_compile_flag_is_checked():
    with pytest.raises(ValueError, match='compile must be a bool or a dict'):
        twins_mm.TwinsSVT(TINY_SVT, compile='yes')


def test_deep_copy_of_a_compiled_model_runs_its_own_weights():
    """mmengine's EMA hook deep-copies the model: the copy must not run the original's weights."""
    import copy
    import pickle
    torch.manual_seed(0)
    model = twins_mm.TwinsSVT(TINY_SVT, compile=dict(backend='aot_eager')).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # compiled before the copy
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.mul_(0.5)
        eager = twins_mm.TwinsSVT(TINY_SVT).eval()
        eager.load_state_dict(twin.state_dict())
        for a, b in zip(twin(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(twin(x)[3], model(x)[3])
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for a, b in zip(restored(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def fixed_draw(model, keep):
    for m in model.modules():
        if hasattr(m, 'draw_keep'):
            m.draw_keep = lambda batch, device, keep=keep: torch.tensor(keep, device=device)


def test_training_forward_has_no_graph_breaks():
    model = twins_mm.TwinsSVT(TINY_SVT, drop_path_rate=0.3).train()
    explained = torch._dynamo.explain(model._forward)(torch.randn(2, 3, 100, 164))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_training_equals_eager_with_the_same_draw():
    """Stochastic depth takes its multiply form in the graph: same outputs and gradients."""
    torch.manual_seed(0)
    eager = twins_mm.TwinsSVT(TINY_SVT, drop_path_rate=0.3).train()
    compiled = twins_mm.TwinsSVT(TINY_SVT, drop_path_rate=0.3,
                                 compile=dict(backend='aot_eager')).train()
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        fixed_draw(model, [True, False, True])
    x = torch.randn(3, 3, 100, 164)
    results = []
    for model in (eager, compiled):
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        results.append((outs, [p.grad for p in model.parameters()]))
    (outs_e, grads_e), (outs_c, grads_c) = results
    for a, b in zip(outs_c, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_multiscale_training_recompiles_a_bounded_number_of_times():
    """Multi-scale training: one static graph, then one dynamic graph per window layout.

    The layout of a stage's map is, per side, whole 7x7 windows or padded (and one window or
    several). mmdet pads a batch to a multiple of 32, so every side is 32 k pixels and its
    four stage maps are 8k, 4k, 2k and k tokens long: from k >= 8 on (sides of 256 pixels
    and more; the 3x recipe resizes to 480-800 short / 1333 long) the layout of every stage
    is set by whether k is a multiple of 7, per side: four layouts, five compilations, under
    Dynamo's default limit of 8 (past it, Dynamo would run the forward eagerly).
    At batch 1, torch's CPU convolution takes oneDNN only above 20480 input elements, and Dynamo
    guards on that choice: these sizes keep the tiny model's maps above it (at batch 2 or more,
    as in training, the choice does not depend on the size). docs/compile.md."""
    counter = CompileCounterWithBackend('aot_eager')
    model = twins_mm.TwinsSVT(TINY_SVT, drop_path_rate=0.2, compile=dict(backend=counter)).train()
    padded_k = [(12, 15), (15, 12), (13, 16), (16, 13), (12, 17)]  # k % 7 != 0, both sides
    whole_k = [(14, 13), (21, 12),                                  # rows whole
               (13, 14), (12, 21),                                  # columns whole
               (14, 14), (21, 14)]                                  # both whole
    compiles_after = []
    for kh, kw in padded_k + whole_k:
        h, w = 32 * kh, 32 * kw
        outs = model(torch.randn(1, 3, h, w))
        sum(o.sum() for o in outs).backward()
        assert outs[0].shape[-2:] == (h // 4, w // 4)
        compiles_after.append(counter.frame_count)
    # Static graph, dynamic graph for the padded layout, then one per new layout, each
    # serving the second size of its layout without compiling again.
    assert compiles_after == [1, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5]
    assert counter.frame_count <= torch._dynamo.config.recompile_limit
