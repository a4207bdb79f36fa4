"""Config preparation shared by ``tools/train.py`` and ``tools/test.py``.

The tools serve mmseg and mmdet configs alike: the config's ``default_scope`` picks the
library, and the Runner, registries and hooks of that scope do the rest. What is added here:
the dataset check before anything heavy is built, and CPU-only distributed runs (mmengine
0.10.7 calls ``torch.cuda.set_device`` and passes ``device_ids`` to DDP, and torch's
SyncBatchNorm refuses CPU tensors).
"""
import importlib.util
import os
import os.path as osp
import sys
import warnings

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner

from twins_mm.data_check import DatasetCheckError, check_datasets

SUPPORTED_SCOPES = ('mmseg', 'mmdet')
# scope -> (the distribution that provides it, twins_mm's extra that installs it)
SCOPE_PACKAGES = {'mmseg': ('mmsegmentation', 'seg'), 'mmdet': ('mmdet', 'det')}


def _install_hint(scope: str) -> str:
    package, extra = SCOPE_PACKAGES[scope]
    return (f'{package} is not installed: install it with pip install ".[{extra}]" from the '
            f'twins_mm clone (or pip install {package})')

# Known upstream deprecation warnings that say nothing to a user of our tools, as
# (message, category, module that triggers it). mmengine 0.10 imports and then reloads
# pkg_resources (mmengine/utils/package_utils.py: is_installed) once per 'mmseg::' / 'mmdet::'
# config base: setuptools warns on the import and on every reload (the reload is reported
# from importlib). Five of them came before our own first line.
UPSTREAM_DEPRECATION_NOISE = (
    (r'pkg_resources is deprecated as an API', UserWarning,
     r'(mmengine\.utils\.package_utils|importlib)$'),
)


def silence_upstream_deprecation_noise() -> None:
    """Called by our tools (train, test, inference) before they read a config; never on
    ``import twins_mm``, so a user's own scripts keep every warning."""
    for message, category, module in UPSTREAM_DEPRECATION_NOISE:
        warnings.filterwarnings('ignore', message=message, category=category, module=module)


def add_common_args(parser) -> None:
    """The flags shared by mmseg's and mmdet's train.py and test.py."""
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. train_cfg.max_iters=100)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_with_local_rank(parser, argv=None):
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_runner(cfg):
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def read_config(path: str) -> Config:
    """Config.fromfile, ending the tool with one line where the file or the library that
    its 'mmseg::' / 'mmdet::' bases come from is missing."""
    if not osp.isfile(path):
        sys.exit(f'error: config file {path!r} does not exist.')
    try:
        return Config.fromfile(path)
    except ModuleNotFoundError as err:
        # mmengine's error for an 'mmseg::' / 'mmdet::' base whose library is missing
        scope = next((s for s, (package, _) in SCOPE_PACKAGES.items()
                      if str(err).startswith(f'{package} is not installed')), None)
        if scope is None:
            raise
        sys.exit(f'error: {path} inherits {scope}:: configs, but {_install_hint(scope)}.')


def require_library(scope: str) -> None:
    """Ends the tool with one line where the library of a config's scope is missing."""
    if importlib.util.find_spec(scope) is None:
        sys.exit(f'error: the config sets default_scope={scope!r}, but {_install_hint(scope)}.')


def load_config(args) -> Config:
    """Config.fromfile + ``--cfg-options`` + launcher + work_dir, as the upstream tools do."""
    cfg = read_config(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def config_scope(cfg) -> str:
    scope = cfg.get('default_scope')
    if scope not in SUPPORTED_SCOPES:
        sys.exit(f'error: the config sets default_scope={scope!r}; these tools run '
                 f'{" and ".join(SUPPORTED_SCOPES)} configs (add default_scope=\'mmseg\' or '
                 '\'mmdet\' to it).')
    require_library(scope)
    init_default_scope(scope)
    return scope


def check_data_or_exit(cfg, splits) -> None:
    try:
        check_datasets(cfg, splits)
    except DatasetCheckError as e:
        sys.exit(f'error: {e}')


def _replace_sync_bn(node) -> None:
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
        for value in node.values():
            _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_sync_bn(value)


def end_distributed() -> None:
    """Destroys the default process group, if any, before the interpreter exits: a gloo group
    left to the interpreter's finalisation can abort the process (SIGABRT, "terminate called
    without an active exception") after a run that succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def prepare_cpu_distributed(cfg) -> None:
    """Makes ``--launcher pytorch`` work without a GPU (gloo backend, BN instead of SyncBN)."""
    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    # torch's SyncBatchNorm only runs on accelerators: on CPU each process normalises its
    # own batch (equal to SyncBN when the per-process batch statistics are not needed).
    _replace_sync_bn(cfg.model)
    if cfg.get('sync_bn') is not None:
        cfg.sync_bn = None
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None  # a CPU module takes no device ids
    cfg.model_wrapper_cfg = wrapper
    if cfg.launcher == 'pytorch' and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend='gloo', rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']))
    print_log('No GPU: distributed run on the gloo backend, SyncBN replaced by BN.',
              logger='current')
