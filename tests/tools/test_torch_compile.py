"""The opt-in ``compile`` flag: one graph (no breaks) and the eager outputs.

A small custom SVT has every block kind (LSA with padding and mask, GSA with and without
sub-sampling, PEG, stage norms). The equivalence test compiles with the 'aot_eager'
backend: the same Dynamo graph and AOTAutograd decomposition that inductor receives,
without inductor's C++ code generation (about 90 s on 2 cores even for this model).
"""
import pytest
import torch

import twins_mm

TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])


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
