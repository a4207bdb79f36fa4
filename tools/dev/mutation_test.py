"""Break the package on purpose, one line at a time, and check that the tests notice.

Each entry of ``BREAKAGES`` is a one-line change (a file, a snippet of it, its replacement)
that removes or breaks a behaviour the README and docs claim, with the tests expected to
catch it. For each, the script applies the change to a private copy of the repository
(never to this checkout), runs the expected tests in that copy, and, when none of them
fails, the suite's fast subset; it prints whether the breakage was caught and by which
tests. A test that already fails without any breakage (the baseline run) proves nothing and
is reported apart.

  .venv/bin/python tools/dev/mutation_test.py                  # every breakage, at HEAD
  .venv/bin/python tools/dev/mutation_test.py --worktree       # uncommitted changes included
  .venv/bin/python tools/dev/mutation_test.py --only skip_form_off masking_off
  .venv/bin/python tools/dev/mutation_test.py --list
  .venv/bin/python tools/dev/mutation_test.py --markdown table.md   # the docs/testing.md table

The copy is made with ``git archive`` (or from the working tree's tracked and untracked,
not ignored, files with ``--worktree``) in a temporary folder; pytest runs there with that
folder first on ``PYTHONPATH``, and the script checks that ``twins_mm`` is imported from the
copy, not from the editable install. Not part of CI: about 15 minutes on 2 CPU cores.
Exit status 1 when a breakage is missed, or its snippet or tests no longer exist.
"""
import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What runs when no expected test catches a breakage (the suite's fast subset).
FAST_SUBSET = ['tests/ops', 'tests/models', 'tests/test_checkpoints.py', 'tests/test_compat.py',
               'tests/test_safetensors_and_bad_files.py', 'tests/tools/test_onnx_export.py']

PATHS = 'tests/ops/test_paths_taken.py'
OPS = 'tests/ops/test_ops.py'
MEMORY = 'tests/models/test_memory_savings.py'
LSA = 'tests/models/test_lsa_masking.py'
TWINS = 'tests/models/test_twins.py'
ONNX = 'tests/tools/test_onnx_export.py'
CKPT = 'tests/test_checkpoints.py'


@dataclasses.dataclass
class Breakage:
    name: str
    what: str  # the behaviour it removes, in the words of the docs
    path: str
    original: str
    replacement: str
    catchers: Sequence[str]  # pytest node ids (a file, a test, or a parametrised test)


BREAKAGES: List[Breakage] = [
    # ---------------------------------------------------------------- fast paths taken
    Breakage('cpu_linear_plain', 'CPU inference runs the attention linears as plain '
             'linear layers instead of the fused oneDNN kernels',
             'twins_mm/ops/__init__.py',
             "    if select_path(x) is Path.CPU_INFERENCE:\n        return cpu_fused.",
             "    if False:\n        return cpu_fused.",
             [f'{PATHS}::test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel']),
    Breakage('cpu_mlp_plain', 'CPU inference runs the MLP as plain modules instead of the '
             'fused oneDNN kernels',
             'twins_mm/ops/__init__.py',
             '    if path is Path.CPU_INFERENCE:\n        return mlp.gelu_mlp_cpu_inference',
             '    if False:\n        return mlp.gelu_mlp_cpu_inference',
             [f'{PATHS}::test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel',
              f'{OPS}::test_public_ops_follow_the_dispatch']),
    Breakage('residual_not_fused', 'CPU inference adds the residual in a separate pass '
             'instead of inside the oneDNN kernel',
             'twins_mm/ops/cpu_fused.py',
             '    if residual.is_contiguous():',
             '    if False:',
             [f'{PATHS}::test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel']),
    Breakage('mlp_not_chunked', 'the CPU inference MLP never runs in row chunks on large maps',
             'twins_mm/ops/mlp.py',
             '    if rows.shape[0] * fc1.out_features <= CHUNK_THRESHOLD:',
             '    if True:',
             [f'{OPS}::test_cpu_inference_mlp_equals_reference']),
    Breakage('partition_reference_always', 'eager LSA never runs the one-pass window '
             'partition (the reference everywhere)',
             'twins_mm/ops/__init__.py',
             '    if select_path(qkv) is Path.GRAPH:',
             '    if True:',
             [f'{PATHS}::test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples',
              f'{PATHS}::test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel']),
    Breakage('merge_reference_always', 'eager LSA never runs the one-pass window merge',
             'twins_mm/ops/__init__.py',
             '    if select_path(out) is Path.GRAPH:',
             '    if True:',
             [f'{PATHS}::test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples',
              f'{PATHS}::test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel']),
    Breakage('recompute_mlp_off', 'training runs the plain MLP (autograd keeps GELU\'s '
             'output) instead of the GELU-recomputing one',
             'twins_mm/ops/__init__.py',
             '    if path is Path.TRAINING:',
             '    if False:',
             [f'{PATHS}::test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples',
              f'{MEMORY}::test_backbone_training_saves_one_hidden_tensor_per_block',
              f'{OPS}::test_public_ops_follow_the_dispatch']),
    Breakage('mlp_recompute_is_plain', 'the training MLP is plain autograd (keeps GELU\'s '
             'output) behind the recompute function\'s name',
             'twins_mm/ops/mlp.py',
             '    out = GeluRecomputeMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)',
             '    out = gelu_mlp_reference(x, fc1, fc2)',
             [f'{MEMORY}::test_recompute_mlp_saves_one_hidden_tensor_less_than_plain_autograd',
              f'{MEMORY}::test_backbone_training_saves_one_hidden_tensor_per_block']),
    Breakage('skip_form_off', 'eager training runs dropped samples\' branches (the multiply '
             'form) instead of skipping them',
             'twins_mm/ops/__init__.py',
             '    if select_path(x) is Path.GRAPH:\n        # The draw',
             '    if True:\n        # The draw',
             [f'{PATHS}::test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples']),
    Breakage('skip_form_computes_all', 'the skip form computes the branch on the whole batch '
             'and keeps the kept samples\' rows afterwards (same values, no saving)',
             'twins_mm/ops/drop_path.py',
             '    out = branch(x.index_select(0, kept)).to(x.dtype)',
             '    out = branch(x).index_select(0, kept).to(x.dtype)',
             [f'{PATHS}::test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples',
              f'{MEMORY}::test_skip_form_mlp_branch_saves_the_kept_samples_only',
              f'{MEMORY}::test_skip_form_attention_branch_saves_what_the_kept_samples_need']),
    # ---------------------------------------------------------------- numerics of the fast paths
    Breakage('gelu_recompute_wrong', 'the MLP backward recomputes GELU with the tanh '
             'approximation instead of the exact GELU of the forward',
             'twins_mm/ops/mlp.py',
             '                gelu_h = torch.ops.aten.gelu.out(h, out=buf)',
             "                gelu_h = torch.ops.aten.gelu.out(h, approximate='tanh', out=buf)",
             [f'{OPS}::test_gelu_recompute_mlp_gradcheck_float64']),
    Breakage('autocast_mlp_fp32', 'under autocast the MLP computes in fp32 instead of '
             'autocast\'s dtype',
             'twins_mm/ops/mlp.py',
             '        dtype = autocast_dtype(x) or x.dtype',
             '        dtype = x.dtype',
             # In the CPU backbone the MLP's input is already bf16 (the residual stream
             # follows the patch embedding's autocast conv), so only the op test sees it.
             [f'{OPS}::test_gelu_recompute_mlp_under_autocast_equals_reference']),
    Breakage('autocast_takes_fp32_kernels', 'autocast inference takes the fp32-only oneDNN '
             'kernels',
             'twins_mm/ops/dispatch.py',
             '            and autocast_dtype(x) is None):',
             '            ):',
             # As above: inside the CPU backbone the ops see bf16 inputs either way.
             [f'{OPS}::test_dispatch_names_the_path']),
    Breakage('drop_path_scaled_twice', 'stochastic depth divides kept samples by the keep '
             'probability twice',
             'twins_mm/ops/drop_path.py',
             '    scale = 1. / keep_prob',
             '    scale = 1. / keep_prob ** 2',
             [f'{OPS}::test_stochastic_depth_skip_equals_multiply']),
    Breakage('drop_path_twice', 'each residual branch is dropped by two independent draws '
             '(mmseg 1.2.2 applies DropPath twice)',
             'twins_mm/models/twins.py',
             '        return torch.rand(batch, device=device) >= self.drop_prob',
             '        return (torch.rand(batch, device=device) >= self.drop_prob) & '
             '(torch.rand(batch, device=device) >= self.drop_prob)',
             [f'{TWINS}::test_stochastic_depth_keeps_samples_at_the_right_rate']),
    # ---------------------------------------------------------------- masking
    Breakage('masking_off', 'eager LSA attends to the zero padding (no key mask)',
             'twins_mm/models/twins.py',
             '        if ops.exporting() or H % ws or W % ws:',
             '        if ops.exporting():',
             [f'{LSA}::test_lsa_equals_per_window_attention_over_valid_tokens',
              f'{LSA}::test_lsa_training_path_masks_exactly_forward_and_backward']),
    Breakage('mask_needs_both_pads', 'LSA masks only when both pads are non-zero',
             'twins_mm/models/twins.py',
             '        if ops.exporting() or H % ws or W % ws:',
             '        if ops.exporting() or H % ws and W % ws:',
             [f'{LSA}::test_lsa_equals_per_window_attention_over_valid_tokens']),
    Breakage('export_mask_only_if_traced_padded', 'an exported graph masks the padded keys '
             'only when the traced size itself needed padding',
             'twins_mm/models/twins.py',
             '        if ops.exporting() or H % ws or W % ws:',
             '        if H % ws or W % ws:',
             [f'{ONNX}::test_backbone_round_trip[opset23-whole-window-example]']),
    Breakage('mask_always', 'LSA builds and applies a key mask for maps of whole windows too '
             '(same values, a slower attention)',
             'twins_mm/models/twins.py',
             '        if ops.exporting() or H % ws or W % ws:',
             '        if True:',
             [f'{PATHS}::test_attention_gets_a_mask_only_where_a_map_needs_padding']),
    Breakage('window_key_mask_off_by_one', 'the key mask treats the first padded row as a '
             'real token',
             'twins_mm/ops/windows.py',
             '    rows = torch.arange(nh * ws, device=device) < H',
             '    rows = torch.arange(nh * ws, device=device) <= H',
             [f'{LSA}::test_lsa_equals_per_window_attention_over_valid_tokens',
              f'{LSA}::test_window_key_mask_flags_exactly_the_padding']),
    # ---------------------------------------------------------------- architecture
    Breakage('block_eps', 'block LayerNorms use eps 1e-5 (mmseg) instead of the official 1e-6',
             'twins_mm/models/twins.py',
             '        self.norm1 = nn.LayerNorm(dim, eps=1e-6)',
             '        self.norm1 = nn.LayerNorm(dim, eps=1e-5)',
             [f'{TWINS}::test_layernorm_eps_and_structure']),
    Breakage('peg_after_block_1', 'the position encoding (PEG) runs after block 1 instead '
             'of block 0',
             'twins_mm/models/twins.py',
             '                if j == 0:',
             '                if j == 1:',
             [f'{TWINS}::test_peg_runs_once_per_stage_after_block_zero']),
    # ---------------------------------------------------------------- frozen stages
    Breakage('frozen_stages_trainable', 'frozen stages keep requires_grad',
             'twins_mm/models/twins.py',
             '                p.requires_grad = False',
             '                p.requires_grad = True',
             [f'{TWINS}::test_frozen_stages_and_eval_mode']),
    Breakage('frozen_stages_train_mode', 'frozen stages go back to train mode with the model',
             'twins_mm/models/twins.py',
             '        super().train(mode)\n        self._freeze_stages()',
             '        super().train(mode)',
             [f'{TWINS}::test_frozen_stages_and_eval_mode']),
    Breakage('frozen_stages_off_by_one', 'frozen_stages=k freezes k-1 stages',
             'twins_mm/models/twins.py',
             '        return [m for i in range(self.frozen_stages) for m in self.stage_modules(i)]',
             '        return [m for i in range(self.frozen_stages - 1) for m in self.stage_modules(i)]',
             [f'{TWINS}::test_frozen_stages_and_eval_mode']),
    # ---------------------------------------------------------------- checkpoints
    Breakage('variant_check_off', 'a checkpoint of another variant is not named as such',
             'twins_mm/checkpoints.py',
             "        raise CheckpointLayoutError(\n            f'Checkpoint of another variant",
             "        print(\n            f'Checkpoint of another variant",
             [f'{CKPT}::test_wrong_variant_is_named']),
    Breakage('checkpoint_check_off', 'a checkpoint that does not fit is loaded silently '
             '(mmengine\'s strict=False)',
             'twins_mm/checkpoints.py',
             '    check_compatible(model, state, info)\n',
             '    pass\n',
             [f'{CKPT}::test_shape_mismatch_and_unknown_layout_are_named',
              f'{CKPT}::test_wrong_variant_is_named']),
    Breakage('untrusted_pickle_loaded', 'a checkpoint with an arbitrary pickled object is '
             'unpickled instead of refused',
             'twins_mm/compat.py',
             '            if _is_trusted(filename):',
             '            if True:',
             ['tests/test_compat.py::test_arbitrary_pickled_object_is_refused_with_clear_message']),
    # ---------------------------------------------------------------- ONNX export
    Breakage('onnx_upsample_static', 'the exported segmentor keeps mmseg\'s float-scale '
             'upsampling (sizes frozen at the example\'s)',
             'tools/deployment/pytorch2onnx.py',
             '            if (isinstance(child, Upsample) and not child.size',
             '            if (False and not child.size',
             [f'{ONNX}::test_cli_exports_a_trained_segmentor_that_runs_at_other_sizes']),
    Breakage('onnx_checkpoint_not_strict', 'the export tool loads a segmentor checkpoint '
             'that does not fit the config with mmengine\'s strict=False (random weights '
             'exported)',
             'tools/deployment/pytorch2onnx.py',
             "            load_checkpoint(model, checkpoint, map_location='cpu', strict=True)",
             "            load_checkpoint(model, checkpoint, map_location='cpu', strict=False)",
             [f'{ONNX}::test_cli_refuses_a_checkpoint_of_another_model']),
    Breakage('onnx_missing_config_unchecked', 'the export tool gives a traceback for a '
             'config file that does not exist',
             'tools/deployment/pytorch2onnx.py',
             '    if args.config and not os.path.isfile(args.config):',
             '    if False:',
             [f'{ONNX}::test_cli_bad_arguments_are_named']),
]


# ------------------------------------------------------------------------------ running
def git(*args: str) -> str:
    return subprocess.run(['git', '-C', REPO, *args], check=True, capture_output=True,
                          text=True).stdout


def make_copy(worktree: bool, ref: str) -> Tuple[str, str]:
    """A private copy of the repository -> (its folder, what it holds)."""
    dest = tempfile.mkdtemp(prefix='twins_mm_mutants_')
    commit = git('rev-parse', '--short', ref).strip()
    if worktree:
        files = [f for f in git('ls-files', '-co', '--exclude-standard', '-z').split('\0') if f]
        for rel in files:
            src = os.path.join(REPO, rel)
            if os.path.isfile(src):  # deleted but still tracked files are skipped
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(dest, rel))
        dirty = bool(git('status', '--porcelain', '--untracked-files=no').strip())
        label = f'working tree at {commit}' + (' with uncommitted changes' if dirty else '')
    else:
        archive = subprocess.run(['git', '-C', REPO, 'archive', '--format=tar', ref],
                                 check=True, capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
        label = f'commit {commit}'
    return dest, label


def env_for(copy: str) -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([copy] + [p for p in [env.get('PYTHONPATH')] if p])
    env.pop('PYTEST_ADDOPTS', None)
    return env


def check_imports_copy(copy: str) -> str:
    out = subprocess.run([sys.executable, '-c', 'import twins_mm; print(twins_mm.__file__)'],
                         cwd=copy, env=env_for(copy), capture_output=True, text=True)
    where = out.stdout.strip()
    if out.returncode or not os.path.realpath(where).startswith(os.path.realpath(copy)):
        raise SystemExit(f'twins_mm is not imported from the copy {copy} but from {where!r} '
                         f'({out.stderr.strip()[-500:]}); the breakages would not be tested.')
    return where


@dataclasses.dataclass
class Run:
    failed: List[str]
    returncode: int
    seconds: float
    tail: str


def pytest(copy: str, targets: Sequence[str], stop_first: bool, timeout: int) -> Run:
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o', 'addopts=',
           '-rfE', '--tb=line', *(['-x'] if stop_first else []), *targets]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
        return Run(['<timeout>'], -1, time.time() - t0, text[-2000:])
    text = out.stdout + out.stderr
    failed = sorted({m.group(2) for m in re.finditer(r'^(FAILED|ERROR) (\S+)', text, re.M)})
    return Run(failed, out.returncode, time.time() - t0, text[-2000:])


def apply(copy: str, b: Breakage) -> Optional[str]:
    """Applies ``b`` in the copy; returns the original text, or None if the snippet is not
    found exactly once (the table no longer matches the code)."""
    path = os.path.join(copy, b.path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read()
    if text.count(b.original) != 1:
        return None
    with open(path, 'w') as f:
        f.write(text.replace(b.original, b.replacement))
    return text


def restore(copy: str, b: Breakage, text: str):
    with open(os.path.join(copy, b.path), 'w') as f:
        f.write(text)


def short(nodeid: str) -> str:
    return nodeid.replace('tests/', '', 1)


def grouped(nodeids: Sequence[str]) -> List[str]:
    """Failing tests, the parametrised cases of one test function counted together."""
    cases: Dict[str, int] = {}
    for nodeid in nodeids:
        base = short(nodeid).split('[')[0]
        cases[base] = cases.get(base, 0) + 1
    return [f'`{base}`' + (f' ({n} cases)' if n > 1 else '') for base, n in cases.items()]


def table(label: str, rows) -> List[str]:
    lines = [f'Breakages run against the {label} ({time.strftime("%Y-%m-%d")}, '
             f'`tools/dev/mutation_test.py`).', '',
             '| breakage | file | result | failing tests |', '|---|---|---|---|']
    for b, status, caught, _ in rows:
        lines.append(f'| {b.what} (`{b.name}`) | `{b.path}` | {status} | '
                     f'{"<br>".join(grouped(caught))} |')
    n_caught = sum(s.startswith('caught') for _, s, _, _ in rows)
    lines += ['', f'{n_caught} of {len(rows)} breakages caught.']
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', nargs='+', metavar='NAME', help='run these breakages only')
    p.add_argument('--list', action='store_true', help='list the breakages and exit')
    p.add_argument('--worktree', action='store_true',
                   help='copy the working tree (uncommitted changes included) instead of a commit')
    p.add_argument('--ref', default='HEAD', help='the commit to copy (default HEAD)')
    p.add_argument('--timeout', type=int, default=1800, help='seconds per pytest run')
    p.add_argument('--no-fallback', action='store_true',
                   help='when no expected test catches a breakage, do not run the fast subset')
    p.add_argument('--markdown', metavar='FILE', help='also write the result table here')
    p.add_argument('--keep', action='store_true', help='keep the temporary copy')
    args = p.parse_args(argv)

    names = [b.name for b in BREAKAGES]
    if len(set(names)) != len(names):
        raise SystemExit('duplicate breakage names')
    if args.list:
        for b in BREAKAGES:
            print(f'{b.name:34s} {b.path}: {b.what}')
        return 0
    chosen = BREAKAGES
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f'unknown breakage(s) {unknown}; --list shows the names')
        chosen = [b for b in BREAKAGES if b.name in args.only]
    if args.worktree and args.ref != 'HEAD':
        p.error('--worktree copies the working tree; --ref names a commit: use one of them')

    # A terminated run still removes its copy (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    copy, label = make_copy(args.worktree, args.ref)
    try:
        print(f'[mutation] copy of the {label} in {copy}; twins_mm imported from '
              f'{check_imports_copy(copy)}', flush=True)
        expected = sorted({t for b in chosen for t in b.catchers})
        base = pytest(copy, expected, stop_first=False, timeout=args.timeout)
        if base.returncode not in (0, 1):
            raise SystemExit(f'the baseline run of the expected tests did not complete '
                             f'(pytest exit {base.returncode}): a test id may no longer exist.'
                             f'\n{base.tail}')
        if base.failed:
            print(f'[mutation] failing without any breakage (not counted): {base.failed}')
        print(f'[mutation] baseline: {len(expected)} expected tests pass ({base.seconds:.0f} s)',
              flush=True)

        rows = []
        for b in chosen:
            text = apply(copy, b)
            if text is None:
                rows.append((b, 'STALE', [], 0.))
                print(f'[mutation] {b.name}: snippet not found exactly once in {b.path}',
                      flush=True)
                continue
            try:
                run = pytest(copy, b.catchers, stop_first=False, timeout=args.timeout)
                caught = [t for t in run.failed if t not in base.failed]
                status, seconds = ('caught' if caught else 'MISSED'), run.seconds
                if not caught and not args.no_fallback:
                    wide = pytest(copy, FAST_SUBSET, stop_first=True, timeout=args.timeout)
                    caught = [t for t in wide.failed if t not in base.failed]
                    seconds += wide.seconds
                    status = 'caught elsewhere' if caught else 'MISSED'
            finally:
                restore(copy, b, text)
            rows.append((b, status, caught, seconds))
            print(f'[mutation] {b.name}: {status} ({seconds:.0f} s) '
                  f'{", ".join(short(t) for t in caught)}', flush=True)

        lines = table(label, rows)
        n_caught = sum(s.startswith('caught') for _, s, _, _ in rows)
        print('\n'.join(lines))
        if args.markdown:
            with open(args.markdown, 'w') as f:
                f.write('\n'.join(lines) + '\n')
        return 0 if n_caught == len(rows) else 1
    finally:
        if args.keep:
            print(f'[mutation] copy kept in {copy}')
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
