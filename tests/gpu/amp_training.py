"""Short training runs of the real configs through ``tools/train.py``, in this process.

Shared by the CPU end-to-end AMP tests (``tests/e2e/test_e2e_amp.py``, bf16) and the GPU tier
(``tests/gpu/test_amp_training_cuda.py``, fp16). ``tools/train.py``'s own ``main`` runs: it
loads the config, applies ``--amp`` and ``--cfg-options`` exactly as for a user, and builds
mmengine's Runner; only its ``build_runner`` is wrapped (the real one still builds the runner)
to keep the runner and to put forward hooks on the backbone, which record what autocast state
the backbone ran under and the dtype of its activations.

``gpu_checks_pass=True`` is for CPU runs only: it answers "a GPU is present" to the two
device checks that stand between ``--amp`` and mmengine's AmpOptimWrapper on a CPU machine:
``tools/train.py``'s ``amp_device_available`` (which otherwise refuses ``--amp`` / turns an
AmpOptimWrapper config into fp32) and the ``is_cuda_available`` that
``AmpOptimWrapper.__init__`` asserts on. Everything else, AmpOptimWrapper's ``optim_context``
(mmengine's ``autocast``, which picks the device and dtype itself), its GradScaler,
``update_params`` and the model, is the code that runs on a GPU. mmengine builds the
GradScaler for CUDA; without a GPU torch disables it (scale 1, ``step`` = optimizer step),
which bf16 does not need. ``cpu_grad_scaler=True`` (CPU runs) builds that scaler for the
CPU's tensors instead (``torch.amp.GradScaler('cpu')``, the class mmengine's CUDA scaler
derives from), so that its scaling and unscaling really run and can be checked.

Each run records the gradients of the backbone that the optimizer's first step receives
(after the wrapper's unscaling), for comparison with an fp32 run of the same weights and data.
"""
import functools
import importlib.util
import math
import os.path as osp
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
AMP_WRAPPER_MODULE = 'mmengine.optim.optimizer.amp_optimizer_wrapper'


def load_train_tool():
    """A fresh module object of tools/train.py (nothing set on it leaks to other tests)."""
    spec = importlib.util.spec_from_file_location(f'_twins_train_tool_{uuid.uuid4().hex}',
                                                  osp.join(REPO, 'tools', 'train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The aten ops that do a backbone's multiply-accumulate work: convolutions, linear layers
# (addmm / mm / bmm after decomposition) and attention.
COMPUTE_OPS = ('convolution', 'addmm', 'mm', 'bmm', 'baddbmm', 'matmul', 'linear',
               'scaled_dot_product')


class ComputeDtypes(TorchDispatchMode):
    """Records, per aten compute op (``COMPUTE_OPS``), the dtypes of its floating-point
    tensor inputs, as the kernels receive them (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(op in name for op in COMPUTE_OPS):
            self.ops.setdefault(name, set()).update(
                a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        return func(*args, **(kwargs or {}))


class BackboneProbe:
    """Forward hooks on a backbone: the autocast state inside its forward, the dtype of the
    stem convolution's output (``patch_embeds[0].proj``), the dtypes of its outputs, and the
    input dtypes of every convolution, matmul and attention kernel of its first forward."""

    def __init__(self, backbone: torch.nn.Module, device_type: str):
        self.backbone = backbone
        self.device_type = device_type
        self.initial = None  # the backbone's parameters at its first forward (after init)
        self.autocast: List[tuple] = []  # (enabled, dtype) per backbone forward
        self.stem_dtypes: List[torch.dtype] = []
        self.output_dtypes: List[torch.dtype] = []
        self.kernels = ComputeDtypes()  # filled during the first forward only
        self._recording = False
        backbone.register_forward_pre_hook(self._pre)
        backbone.register_forward_hook(self._post)
        backbone.patch_embeds[0].proj.register_forward_hook(self._stem)

    def _pre(self, module, args):
        if self.initial is None:
            self.initial = {n: p.detach().double().cpu().clone()
                            for n, p in module.named_parameters()}
            self.kernels.__enter__()
            self._recording = True
        self.autocast.append((torch.is_autocast_enabled(self.device_type),
                              torch.get_autocast_dtype(self.device_type)))

    def _post(self, module, args, outputs):
        if self._recording:
            self.kernels.__exit__(None, None, None)
            self._recording = False
        self.output_dtypes.extend(o.dtype for o in outputs)

    def kernel_dtypes(self) -> dict:
        """{aten op: dtypes of its floating-point inputs} of the first forward."""
        return dict(self.kernels.ops)

    def _stem(self, module, args, output):
        self.stem_dtypes.append(output.dtype)

    def compute_dtypes(self) -> set:
        """The dtypes the stem convolution produced (autocast's dtype where it was on)."""
        return set(self.stem_dtypes)

    def updates(self) -> dict:
        """How far training moved each backbone parameter: final minus initial value."""
        return {n: p.detach().double().cpu() - self.initial[n]
                for n, p in self.backbone.named_parameters()}


@dataclass
class TrainResult:
    losses: List[float]
    wrapper: object
    probe: BackboneProbe
    runner: object = field(repr=False)
    logs: dict = field(default_factory=dict)
    # The backbone's gradients as the optimizer's first step received them: {name: float64}.
    first_step_grads: dict = field(default_factory=dict, repr=False)

    @property
    def finite(self) -> bool:
        return len(self.losses) > 0 and all(math.isfinite(v) for v in self.losses)


def _unwrap(model):
    return model.module if hasattr(model, 'module') else model


def cpu_grad_scaler(monkeypatch) -> None:
    """mmengine's AmpOptimWrapper builds ``torch.cuda.amp.GradScaler``, which disables itself
    without a GPU; build the same scaler for CPU tensors instead (restored after the test)."""
    import importlib
    amp_module = importlib.import_module(AMP_WRAPPER_MODULE)
    monkeypatch.setattr(amp_module, 'GradScaler', functools.partial(torch.amp.GradScaler, 'cpu'))


class FirstStepGradients:
    """Keeps the gradients of ``module``'s parameters at the first ``optimizer.step``."""

    def __init__(self, module: torch.nn.Module):
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.grads: dict = {}
        self.handle = register_optimizer_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        if self.grads:
            return
        for group in optimizer.param_groups:
            for p in group['params']:
                if id(p) in self.names and p.grad is not None:
                    self.grads[self.names[id(p)]] = p.grad.detach().double().cpu().clone()

    def remove(self) -> None:
        self.handle.remove()


def run_train(config: str, work_dir: str, options: List[str], *, amp: bool = False,
              monkeypatch=None, gpu_checks_pass: bool = False, cpu_scaler: bool = False,
              device_type: Optional[str] = None) -> TrainResult:
    """``python tools/train.py CONFIG --work-dir WORK_DIR [--amp] --cfg-options OPTIONS``.

    ``monkeypatch`` (pytest's) is required with ``gpu_checks_pass``: it restores mmengine's
    module after the test. ``LOCAL_RANK`` (which train.py sets) is restored the same way.
    """
    tool = load_train_tool()
    if device_type is None:
        device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    if monkeypatch is not None:
        monkeypatch.setenv('LOCAL_RANK', '0')
    if gpu_checks_pass:
        assert monkeypatch is not None, 'gpu_checks_pass needs pytest monkeypatch'
        import importlib
        amp_module = importlib.import_module(AMP_WRAPPER_MODULE)
        # raising=True (the default): a renamed check fails the test instead of passing it by.
        monkeypatch.setattr(amp_module, 'is_cuda_available', lambda: True)
        assert hasattr(tool, 'amp_device_available'), 'tools/train.py renamed its GPU check'
        tool.amp_device_available = lambda: True
    if cpu_scaler:
        assert monkeypatch is not None, 'cpu_scaler needs pytest monkeypatch'
        cpu_grad_scaler(monkeypatch)
    captured = {}
    build_runner = tool.build_runner

    def build_and_probe(cfg):
        runner = build_runner(cfg)
        captured['runner'] = runner
        backbone = _unwrap(runner.model).backbone
        captured['probe'] = BackboneProbe(backbone, device_type)
        captured['grads'] = FirstStepGradients(backbone)
        return runner

    tool.build_runner = build_and_probe
    name = f'amp_test_{uuid.uuid4().hex[:8]}'
    argv = [osp.join(REPO, config), '--work-dir', work_dir]
    if amp:
        argv.append('--amp')
    try:
        tool.main(argv + ['--cfg-options', *options, f'experiment_name={name}'])
    finally:
        if 'grads' in captured:
            captured['grads'].remove()
    runner = captured['runner']
    hub = runner.message_hub
    losses = [float(v) for v in hub.get_scalar('train/loss').data[0]]
    logs = {key[len('train/'):]: [float(v) for v in buf.data[0]]
            for key, buf in hub.log_scalars.items()
            if key.startswith('train/loss')}
    return TrainResult(losses=losses, wrapper=runner.optim_wrapper, probe=captured['probe'],
                       runner=runner, logs=logs, first_step_grads=captured['grads'].grads)


# mmengine's train loops validate at the last iteration / epoch whatever val_interval says;
# these runs compare training only.
NO_VALIDATION = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']


def update_agreement(run, reference) -> float:
    """Cosine similarity of all backbone weight updates of ``run`` to those of ``reference``
    (runs from the same initial weights): 1 = the same direction of training."""
    a, b = run.probe.updates(), reference.probe.updates()
    assert a.keys() == b.keys()
    va = torch.cat([a[n].flatten() for n in sorted(a)])
    vb = torch.cat([b[n].flatten() for n in sorted(b)])
    assert vb.norm() > 0, 'the reference run did not change the backbone'
    return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-300))


def gradient_agreement(run, reference) -> tuple:
    """(cosine, norm ratio) of the whole backbone gradient of ``run``'s first optimizer step
    to ``reference``'s (same weights, data and stochastic-depth draws)."""
    a, b = run.first_step_grads, reference.first_step_grads
    assert a and a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    va = torch.cat([a[n].flatten() for n in sorted(a)])
    vb = torch.cat([b[n].flatten() for n in sorted(b)])
    assert vb.norm() > 0, 'the reference run has no backbone gradient'
    return float(va @ vb / (va.norm() * vb.norm())), float(va.norm() / vb.norm())


def relative_differences(values, reference) -> List[float]:
    assert len(values) == len(reference), (values, reference)
    return [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, reference)]


# --- The small runs: real configs, demo data, a few iterations -----------------------------

SEG_CONFIG = 'configs/fpn_twins_svt_s_80k.py'
RETINANET_CONFIG = 'configs/retinanet_twins_svt_s_1x.py'
MASK_RCNN_3X_CONFIG = 'configs/mask_rcnn_twins_svt_s_3x.py'


def make_seg_workspace(root: str, size: int = 64) -> dict:
    from twins_mm.demo_data.ade20k import make_ade20k
    from twins_mm.testing import official_state_dict
    data_root = make_ade20k(osp.join(root, 'ade'), num_train=8, num_val=2, size=size, seed=0)
    checkpoint = osp.join(root, 'fake_imagenet_svt_s.pth')
    torch.save({'model': official_state_dict('TwinsSVT', 'small', seed=0)}, checkpoint)
    return dict(data_root=data_root, checkpoint=checkpoint, size=size)


def seg_options(ws: dict, iters: int, batch: int = 2) -> List[str]:
    """The demo's overrides of the FPN config (data, sizes, iterations, checkpoint); the
    config's own stochastic depth (0.2) and decode-head dropout stay. No validation, no
    checkpoint saving, data loaded in this process, seed 0."""
    size = ws['size']
    scale = f'({4 * size},{size})'
    opts = [f'model.backbone.init_cfg.checkpoint={ws["checkpoint"]}',
            f'model.data_preprocessor.size=({size},{size})',
            f'train_dataloader.batch_size={batch}',
            f'train_dataloader.dataset.pipeline.2.scale={scale}',
            f'train_dataloader.dataset.pipeline.3.crop_size=({size},{size})',
            f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters + 1}',
            f'param_scheduler.0.end={iters}',
            f'default_hooks.checkpoint.interval={iters + 1}',
            'default_hooks.checkpoint.save_last=False',
            'default_hooks.logger.interval=1', 'randomness.seed=0', *NO_VALIDATION]
    for split in ('train', 'test'):
        opts += [f'{split}_dataloader.dataset.data_root={ws["data_root"]}',
                 f'{split}_dataloader.num_workers=0',
                 f'{split}_dataloader.persistent_workers=False']
    opts.append(f'test_dataloader.dataset.pipeline.1.scale={scale}')
    return opts


def make_coco_workspace(root: str, num_train: int = 6, size=(128, 96)) -> dict:
    from twins_mm.demo_data.coco import make_coco
    from twins_mm.testing import official_state_dict
    data_root = make_coco(osp.join(root, 'coco'), num_train=num_train, num_val=2, seed=0,
                          size=size)
    checkpoint = osp.join(root, 'fake_imagenet_svt_s.pth')
    torch.save({'model': official_state_dict('TwinsSVT', 'small', seed=0)}, checkpoint)
    return dict(data_root=data_root, checkpoint=checkpoint, size=size)


def det_options(ws: dict, epochs: int = 1, batch: int = 2, resize: bool = True) -> List[str]:
    """A COCO config on the demo data: ``epochs`` epochs, seed 0, no validation or
    checkpoints. The configs' stochastic depth (0.2) and random flip stay. ``resize``: train
    at the demo image size (pipeline step 2, the single-scale configs' Resize); without it the
    config's own train pipeline (the 3x multi-scale policy) is kept."""
    from twins_mm.demo_data.coco import coco_cfg_options
    w, h = ws['size']
    opts = [f'model.backbone.init_cfg.checkpoint={ws["checkpoint"]}',
            f'train_dataloader.batch_size={batch}',
            f'test_dataloader.dataset.pipeline.1.scale=({w},{h})',
            f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs + 1}',
            'param_scheduler.0.end=2', f'param_scheduler.1.end={epochs}',
            f'default_hooks.checkpoint.interval={epochs + 1}',
            'default_hooks.checkpoint.save_last=False',
            'randomness.seed=0', 'default_hooks.logger.interval=1', *NO_VALIDATION]
    if resize:
        opts.append(f'train_dataloader.dataset.pipeline.2.scale=({w},{h})')
    for split in ('train', 'test'):
        opts += [f'{split}_dataloader.num_workers=0',
                 f'{split}_dataloader.persistent_workers=False']
    return opts + [o for o in coco_cfg_options(ws['data_root']) if not o.startswith('val_')]
