"""`make demo`'s scripts, shrunk, run twice: the README says each demo ends with the same
weights in every run (fixed seed, deterministic kernels, a fixed number of CPU threads).
The first run is the whole script (data, training, both evaluations, overlays); the second
stops after training (``--train-only``): the weights are what is compared."""
import os.path as osp

import pytest
import torch

from .seg_support import REPO, run_tool

# The detection script exits with 'training did not improve mAP' when its trained model finds
# nothing above the config's score threshold, as a few iterations leave it; the weights it
# trained are what this test compares.
NOT_IMPROVED = 'error: training did not improve mAP'

SMALL = {
    'demo_segmentation.py': (['--iters', '4', '--num-train', '8', '--num-val', '2',
                              '--size', '64'], 'train/iter_4.pth'),
    'demo_detection.py': (['--epochs', '2', '--num-train', '12', '--num-val', '2',
                           '--warmup-iters', '2', '--width', '96', '--height', '64'],
                          'train/epoch_2.pth'),
}


@pytest.mark.parametrize('script', sorted(SMALL))
def test_two_runs_end_with_the_same_weights(script, tmp_path):
    args, checkpoint = SMALL[script]
    weights = []
    for run, extra in (('first', []), ('second', ['--train-only'])):
        out = str(tmp_path / run)
        proc = run_tool([osp.join(REPO, 'tools', script), '--out', out, *args, *extra],
                        timeout=600, expect_ok=False)
        assert proc.returncode == 0 or NOT_IMPROVED in proc.stderr, \
            (proc.stdout + proc.stderr)[-4000:]
        weights.append(torch.load(osp.join(out, checkpoint), map_location='cpu',
                                  weights_only=False)['state_dict'])
    first, second = weights
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f'{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}'
