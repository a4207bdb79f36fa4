"""``torch.compile`` with inductor (its default backend, CPU) by each route a user takes, with
changing input sizes, in training (forward and backward):

- the backbone's own flag, ``compile=True`` (``model.backbone.compile=True`` in a config);
- ``torch.compile(backbone, dynamic=True)``;
- ``torch.compile(model)`` of a whole model, which turns dynamic at the second size;
- mmengine's ``Runner(compile=True)`` (``compile = True`` in a config), which compiles the
  model's ``train_step``, under multi-scale training.

Each route's outputs and parameter gradients are compared with the same weights run eagerly
(fp32; inductor reorders reductions and fuses operations, so not bit-identical: rtol 1e-4,
atol 1e-5 on outputs, rtol 1e-4, atol 1e-6 on gradients). Under every route the backbone takes its graph path (the traceable reference
code) while Dynamo traces it.

The architecture is two stages of SVT: LSA with padded windows, GSA with (stage 1) and without
(stage 2) sub-sampling, one and two heads, the PEG and a patch embedding of a stage's output
map: each place where the graph path feeds a channels-last map to a convolution or splits
heads for attention. Inductor's compilation time grows with the graph, so the model is kept
to that.
"""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import twins_mm
from twins_mm import ops
from twins_mm.models import twins as twins_module

TINY = dict(embed_dims=[16, 32], num_heads=[1, 2], mlp_ratios=[2, 2], depths=[2, 2],
            sr_ratios=[2, 1], window_sizes=[7, 7])
# Input sizes whose stage maps are all several 7x7 windows, padded on both sides
# (24x32 / 12x16, 32x24 / 16x12, 40x20 / 20x10): one window layout. (Inductor on CPU still
# compiles the third once more: its lowering pins the sizes of the dynamic graph,
# docs/compile.md.)
SIZES = [(96, 128), (128, 96), (160, 80)]
OUT_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts as a fresh process would: Dynamo's memory of sizes (which decides
    when a graph turns dynamic) and its counters are per process."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def graph_breaks():
    return sum(counters['graph_break'].values())


def fixed_draw(model, keep):
    """Stochastic depth draws the same samples in eager and compiled runs."""
    for m in model.modules():
        if hasattr(m, 'draw_keep'):
            m.draw_keep = lambda batch, device, keep=keep: torch.tensor(keep, device=device)


def twin_models(build, **kwargs):
    """(eager, other built with kwargs): the same weights, train mode, a fixed stochastic
    depth draw."""
    torch.manual_seed(0)
    eager = build().train()
    other = build(**kwargs).train()
    other.load_state_dict(eager.state_dict())
    for model in (eager, other):
        fixed_draw(model, [True, False])
    return eager, other


def step(model, x):
    for p in model.parameters():
        p.grad = None
    outs = model(x)
    sum((o * o).mean() for o in outs).backward()
    return [o.detach() for o in outs], [p.grad for p in model.parameters()]


def assert_same_step(compiled, eager, x):
    outs_c, grads_c = step(compiled, x)
    outs_e, grads_e = step(eager, x)
    assert len(outs_c) == len(outs_e)
    for a, b in zip(outs_c, outs_e):
        torch.testing.assert_close(a, b, **OUT_TOL)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, **GRAD_TOL)


def backbone(**kwargs):
    return twins_mm.TwinsSVT(TINY, out_indices=(0, 1), drop_path_rate=0.2, **kwargs)


def test_flag_inductor_matches_eager_and_turns_dynamic_once():
    """``compile=True``: the first size compiles a static graph, the second a dynamic one;
    one graph per compilation (no breaks); inductor's outputs and gradients equal eager's."""
    eager, compiled = twin_models(backbone, compile=True)
    for i, (h, w) in enumerate(SIZES[:2]):
        assert_same_step(compiled, eager, torch.randn(2, 3, h, w))
        assert counters['stats']['unique_graphs'] == i + 1, (h, w)
    assert graph_breaks() == 0, dict(counters['graph_break'])


def test_torch_compile_dynamic_true_of_the_backbone():
    """``torch.compile(backbone, dynamic=True)``: a dynamic graph at each size; two, not one,
    because inductor's CPU lowering pins the sizes a graph was compiled for (docs/compile.md;
    when torch stops doing so this count drops to 1 and the docs should say so)."""
    eager, model = twin_models(backbone)
    compiled = torch.compile(model, dynamic=True)
    for h, w in SIZES[:2]:
        assert_same_step(compiled, eager, torch.randn(2, 3, h, w))
    assert counters['stats']['unique_graphs'] == 2
    assert graph_breaks() == 0, dict(counters['graph_break'])


class TinyDetector(nn.Module):
    """A whole model around the backbone: a 1x1 conv on each output map."""

    def __init__(self):
        super().__init__()
        self.backbone = backbone()
        self.heads = nn.ModuleList(nn.Conv2d(c, 4, 1) for c in TINY['embed_dims'])

    def forward(self, x):
        return [head(o) for head, o in zip(self.heads, self.backbone(x))]


def test_plain_torch_compile_of_a_whole_model_turns_dynamic():
    """``torch.compile(model)``: static at the first size, dynamic (automatically) at the
    second."""
    eager, model = twin_models(TinyDetector)
    compiled = torch.compile(model)
    for i, (h, w) in enumerate(SIZES[:2]):
        assert_same_step(compiled, eager, torch.randn(2, 3, h, w))
        assert counters['stats']['unique_graphs'] == i + 1, (h, w)
    assert graph_breaks() == 0, dict(counters['graph_break'])


def test_graph_path_is_taken_under_torch_compile_from_outside(monkeypatch):
    """Compiled from outside (``torch.compile(model)``, no flag), the window ops take the
    traceable references: Dynamo inlines them, so the graph holds their pad / permute and
    none of the one-pass functions' copies; the eager run takes the one-pass functions."""
    from twins_mm.ops import windows
    calls = []
    for name in ('partition_reference', 'merge_reference'):
        original = getattr(windows, name)
        monkeypatch.setattr(windows, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    eager, model = twin_models(backbone)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    # two LSA blocks, one partition and one merge each
    assert sorted(calls) == ['merge_reference'] * 2 + ['partition_reference'] * 2
    calls.clear()
    step(eager, torch.randn(2, 3, 64, 64))
    assert calls == []


class TinySegmentor:
    """An mmengine BaseModel around the backbone: the loss is the mean square of its maps."""

    @staticmethod
    def build():
        from mmengine.model import BaseModel

        class Model(BaseModel):

            def __init__(self):
                super().__init__()
                self.backbone = twins_mm.TwinsSVT(TINY, out_indices=(0, 1))

            def forward(self, inputs, data_samples=None, mode='tensor'):
                outs = self.backbone(inputs)
                if mode == 'loss':
                    # per-channel means: not fixed by the stage norms, so the loss
                    # depends on every weight from the first iteration on
                    return dict(loss=sum((o.mean((2, 3)) - 0.5).square().sum() for o in outs))
                return outs

        return Model()


class MultiScaleImages(torch.utils.data.Dataset):
    """Batches of two images, each batch at its own size (as a multi-scale resize makes)."""

    def __init__(self, sizes):
        self.sizes = [s for s in sizes for _ in range(2)]

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, *self.sizes[i], generator=g))


def run_mmengine(tmp_path, compile_cfg, sizes):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class RecordLoss(Hook):
        losses = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.losses.append(outputs['loss'].item())

    torch.manual_seed(0)
    recorder = RecordLoss()
    recorder.losses = []
    runner = Runner(
        model=TinySegmentor.build(), work_dir=str(tmp_path / str(compile_cfg)),
        train_dataloader=dict(dataset=MultiScaleImages(sizes), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=len(sizes)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=None, logger=None), custom_hooks=[recorder],
        cfg=dict(compile=compile_cfg), log_level='WARNING', default_scope='mmengine',
        randomness=dict(seed=0))  # the same initial weights in every run
    runner.train()
    return recorder.losses


def test_mmengine_runner_compile_under_multiscale_training(tmp_path):
    """``Runner(compile=True)`` compiles ``train_step`` and trains through three sizes in four
    iterations with eager's loss at every iteration (same seed, so the same initial weights;
    measured <= 1.2e-5 relative)."""
    sizes = [(96, 128), (96, 128), (128, 96), (160, 80)]
    eager = run_mmengine(tmp_path, False, sizes)
    assert counters['stats']['unique_graphs'] == 0
    compiled = run_mmengine(tmp_path, True, sizes)
    assert counters['stats']['unique_graphs'] > 0
    assert len(compiled) == len(sizes) and all(torch.isfinite(torch.tensor(compiled)))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0)


# ------------------------------------------------------------ why the graph path copies
def peg_after_norm():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(16), twins_module.PositionEncodingGenerator(16))


def test_graph_path_peg_compiles_with_dynamic_sizes():
    """The PEG's convolution sees a contiguous copy of the channels-last map under graph
    capture, which inductor compiles with dynamic H and W in training."""
    model = peg_after_norm()
    compiled = torch.compile(model, dynamic=True)
    for h, w in ((24, 32), (32, 20)):
        x = torch.randn(2, h, w, 16, requires_grad=True)
        out = compiled(x)
        grad, = torch.autograd.grad(out.square().sum(), x)
        x_ref = x.detach().requires_grad_()
        ref = model(x_ref)
        ref_grad, = torch.autograd.grad(ref.square().sum(), x_ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_permuted_view_still_fails_in_inductor(monkeypatch):
    """Why the copy: the free permuted view (what eager uses) fails in this torch's inductor
    once sizes are dynamic. When this test fails, torch has fixed it and ``_nchw`` /
    ``_split_heads`` can return the view under graph capture too."""
    monkeypatch.setattr(twins_module, '_nchw', lambda x: x.permute(0, 3, 1, 2))
    compiled = torch.compile(peg_after_norm(), dynamic=True)
    x = torch.randn(2, 24, 32, 16, requires_grad=True)
    with pytest.raises(Exception, match='cannot determine truth value of Relational'):
        compiled(x).sum().backward()


def test_graph_path_copies_only_under_graph_capture(monkeypatch):
    """Eager keeps the free views (no copy, the same memory); under graph capture the conv
    input and the heads are contiguous tensors of their own with the same values."""
    x = torch.randn(2, 5, 6, 8)
    views = twins_module._nchw(x), twins_module._split_heads(x.reshape(2, 30, 8), 1)
    assert all(v.data_ptr() == x.data_ptr() for v in views)
    monkeypatch.setattr(ops, 'graph_capture', lambda: True)
    copies = twins_module._nchw(x), twins_module._split_heads(x.reshape(2, 30, 8), 1)
    for view, copy in zip(views, copies):
        assert copy.is_contiguous() and copy.data_ptr() != x.data_ptr()
        torch.testing.assert_close(copy, view, rtol=0, atol=0)
