"""The docs say what the metafiles say, and speak about the project only.

One source for the zoo numbers: ``configs/metafile-seg.yml`` and ``configs/metafile-det.yml``.
Every markdown table in README.md and docs/*.md whose rows link a config of a metafile is a
zoo table. In such a row, each cell that links a config opens a group: the cells after it,
up to the next link, hold that config's numbers; the cells before the first link hold numbers
shared by every config of the row (parameters, FLOPs). A column is read by its header (below);
a number in any other column of a zoo row fails the test, so no number goes unchecked.
mmsegmentation's re-run numbers are checked against docs/reference.md 6.5, and the metafiles
against the paper tables of docs/reference.md (6.3, 6.6-6.8).

Metafile models without ``Results`` (recipes with no published result) may appear in zoo
tables only with non-numeric result cells (e.g. "no published result").
"""
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METAFILES = ('configs/metafile-seg.yml', 'configs/metafile-det.yml')
LINK = re.compile(r'\[[^\]]*\]\((?:\.\./)?configs/([A-Za-z0-9_.-]+)\.py\)')
NUMBER = re.compile(r'^\**\s*(\d+(?:\.\d+)?)\s*\**$')
DIGIT = re.compile(r'\d')
ZOO_NAME = re.compile(
    r'^(fpn|upernet|retinanet|mask_rcnn)_twins_(pcpvt|svt)_[sbl]_(80k|160k|1x|3x)$')
# Header (lower case, without a leading "paper ") -> what the column holds. A tuple of
# several keys: the cell holds that many values separated by " / ".
COLUMNS = {
    'miou': ('mIoU', ),
    'miou ms+flip': ('mIoU(ms+flip)', ),
    'miou ss / ms+flip': ('mIoU', 'mIoU(ms+flip)'),
    'box ap': ('box AP', ),
    'mask ap': ('mask AP', ),
    'box ap / mask ap': ('box AP', 'mask AP'),
    'params (m)': ('params', ),
    'flops (g)': ('flops', ),
    'mmseg re-run miou / ms+flip': ('rerun ss', 'rerun ms'),
}
# Columns that hold no numbers to check (names, schedules, status words).
TEXT_COLUMNS = {'backbone', 'head', 'detector', 'schedule', 'status', 'variant'}
VARIANTS = {f'{fam}_{s}': f'{fam.upper()}-{s.upper()}' for fam in ('pcpvt', 'svt')
            for s in 'sbl'}


# ----------------------------------------------------------------------------- sources
def load_metafiles(root=ROOT):
    """{config name: {key: value}} with the metrics, 'params' (M) and 'flops' (G);
    None for a model without Results."""
    models = {}
    for rel in METAFILES:
        data = yaml.safe_load((root / rel).read_text())
        for m in data.get('Models', []):
            name = Path(m['Config']).stem
            results = m.get('Results')
            if results is None:
                models[name] = None
                continue
            values = {}
            for r in results if isinstance(results, list) else [results]:
                values.update(r.get('Metrics') or {})
            meta = m.get('Metadata') or {}
            if 'Parameters (M)' in meta:
                values['params'] = float(meta['Parameters (M)'])
            elif 'Parameters' in meta:
                values['params'] = meta['Parameters'] / 1e6
            if 'FLOPs (G)' in meta:
                values['flops'] = float(meta['FLOPs (G)'])
            elif 'FLOPs' in meta:
                values['flops'] = meta['FLOPs'] / 1e9
            models[name] = values
    return models


def reference_section(number, root=ROOT):
    text = (root / 'docs' / 'reference.md').read_text()
    start = re.search(rf'^### {re.escape(number)} ', text, re.M)
    assert start, f'docs/reference.md has no section {number}'
    end = re.search(r'^#{2,3} ', text[start.end():], re.M)
    return text[start.end():start.end() + end.start() if end else None]


def mmseg_reruns(root=ROOT):
    """{('fpn' | 'upernet', 'PCPVT-S'): (ss, ms)} from docs/reference.md 6.5."""
    sec = reference_section('6.5', root)
    out = {}
    for head, part in (('fpn', sec.split('FPN:')[1].split('UPerNet:')[0]),
                       ('upernet', sec.split('UPerNet:')[1])):
        for v, ss, ms in re.findall(r'((?:PCPVT|SVT)-[SBL])\s+(\d+\.\d+)\s*/\s*(\d+\.\d+)', part):
            out[(head, v)] = (float(ss), float(ms))
    assert len(out) == 12, f'docs/reference.md 6.5: found {len(out)} of 12 mmseg re-runs'
    return out


def variant_of(config):
    m = re.search(r'twins_((?:pcpvt|svt)_[sbl])', config)
    return VARIANTS[m[1]] if m else None


# ----------------------------------------------------------------------------- tables
def split_row(line):
    return [c.strip() for c in line.strip().strip('|').split('|')]


def tables(text):
    """Markdown tables: (header cells, [(line number, cells), ...])."""
    lines = text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith('|') and re.match(r'^\s*\|[\s:|-]+\|\s*$', lines[i + 1]):
            header = split_row(lines[i])
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith('|'):
                rows.append((j + 1, split_row(lines[j])))
                j += 1
            yield header, rows
            i = j
        else:
            i += 1


def column_keys(header):
    h = re.sub(r'\s+', ' ', header.lower().replace('*', '')).strip()
    h = re.sub(r'^paper ', '', h)
    return COLUMNS.get(h)


def zoo_cells(text, models):
    """For every zoo row: (line, config, header, keys or None, cell) for each cell."""
    for header, rows in tables(text):
        for line, cells in rows:
            links = [(k, LINK.search(c)[1]) for k, c in enumerate(cells)
                     if LINK.search(c) and LINK.search(c)[1] in models]
            if not links:
                continue
            configs = [name for _, name in links]
            owner = {}
            for k in range(len(cells)):
                before = [name for pos, name in links if pos < k]
                owner[k] = [before[-1]] if before else configs
            for k, cell in enumerate(cells):
                if any(pos == k for pos, _ in links):
                    continue
                head = header[k] if k < len(header) else ''
                for config in owner[k]:
                    yield line, config, head, column_keys(head), cell


def expected(config, key, models, reruns):
    if key in ('rerun ss', 'rerun ms'):
        head = 'fpn' if config.startswith('fpn_') else 'upernet'
        pair = reruns.get((head, variant_of(config)))
        return None if pair is None else pair[key == 'rerun ms']
    values = models[config]
    return None if values is None else values.get(key)


def zoo_mismatches(text, models, reruns):
    """Every disagreement of one markdown text's zoo tables with the metafiles."""
    problems = []
    for line, config, head, keys, cell in zoo_cells(text, models):
        where = f'line {line}, {config}, column {head!r}'
        if keys is None:
            if head.lower().strip() not in TEXT_COLUMNS and DIGIT.search(cell):
                problems.append(f'{where}: {cell!r} is in a column the metafiles do not '
                                'describe (name it as in tests/test_docs.py COLUMNS)')
            continue
        parts = [p.strip() for p in cell.split('/')] if len(keys) > 1 else [cell]
        if len(parts) != len(keys):
            problems.append(f'{where}: {cell!r} should hold {len(keys)} values')
            continue
        for key, part in zip(keys, parts):
            want = expected(config, key, models, reruns)
            number = NUMBER.match(part)
            if number is None:
                if DIGIT.search(part):
                    problems.append(f'{where}: cannot read {part!r}')
                elif want is not None:
                    problems.append(f'{where}: {part!r} but the source has {key} = {want}')
            elif want is None:
                problems.append(f'{where}: {part} but the source has no {key}')
            elif abs(float(number[1]) - round(float(want), 6)) > 1e-9:
                problems.append(f'{where}: {part} but the source has {key} = {want}')
    return problems


def doc_files(root=ROOT):
    return [root / 'README.md'] + sorted((root / 'docs').glob('*.md'))


# ----------------------------------------------------------------------------- tests
def test_every_zoo_table_agrees_with_the_metafiles():
    models, reruns = load_metafiles(), mmseg_reruns()
    problems = []
    for path in doc_files():
        problems += [f'{path.relative_to(ROOT)}: {p}'
                     for p in zoo_mismatches(path.read_text(), models, reruns)]
    assert not problems, '\n'.join(problems)


def test_readme_zoo_lists_every_model_with_results():
    """Each metafile model with a result, and each config of the paper's tables, has a
    README zoo row with its result columns."""
    models = load_metafiles()
    text = (ROOT / 'README.md').read_text()
    metrics = {'mIoU', 'mIoU(ms+flip)', 'box AP', 'mask AP'}
    shown = {config for _, config, _, keys, _ in zoo_cells(text, models)
             if keys and metrics & set(keys)}
    # the models with a published number, and the 36 configs of the paper's tables (four of
    # them, 3x of the large models, have none: their cells say "unknown")
    required = {n for n, v in models.items() if v and metrics & set(v)}
    required |= {n for n in models if ZOO_NAME.match(n)}
    assert len(required) >= 36
    missing = sorted(required - shown)
    assert not missing, f'README.md zoo tables lack these metafile models: {missing}'


def test_metafile_numbers_are_the_paper_tables_of_docs_reference():
    models = load_metafiles()
    problems = []

    def check(config, key, value):
        got = (models.get(config) or {}).get(key)
        if got is None or abs(got - value) > 1e-6:
            problems.append(f'{config} {key}: metafile {got}, docs/reference.md {value}')

    parsed = {}

    def rows(section, pattern):
        found = re.findall(pattern, reference_section(section), re.M)
        parsed[section] = len(found)
        return found

    for row in rows('6.3', r'^\| Twins-((?:PCPVT|SVT)-[SBL]) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| '
                           r'(\d+) \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$'):
        v = row[0].lower().replace('-', '_')
        fpn, up = f'fpn_twins_{v}_80k', f'upernet_twins_{v}_160k'
        for cfg, key, val in ((fpn, 'flops', row[1]), (fpn, 'params', row[2]),
                              (fpn, 'mIoU', row[3]), (up, 'flops', row[4]),
                              (up, 'params', row[5]), (up, 'mIoU', row[6]),
                              (up, 'mIoU(ms+flip)', row[7])):
            check(cfg, key, float(val))
    for row in rows('6.6', r'^\| Twins-((?:PCPVT|SVT)-[SBL]) \| ([^|]+?) \| ([\d.]+) \| '
                           r'([\d.]+) \| ([\d.]+) \|$'):
        v = row[0].lower().replace('-', '_')
        for sched, val in (('1x', row[3]), ('3x', row[4])):
            cfg = f'retinanet_twins_{v}_{sched}'
            check(cfg, 'box AP', float(val))
            check(cfg, 'params', float(row[2]))
            if re.match(r'^\d+$', row[1]):
                check(cfg, 'flops', float(row[1]))
    for row in rows('6.7', r'^\| Twins-((?:PCPVT|SVT)-[SBL]) \| (\d+) \| ([\d.]+) \| ([\d.]+) / '
                           r'([\d.]+) \| ([\d.]+) / ([\d.]+) \|$'):
        v = row[0].lower().replace('-', '_')
        for sched, box, mask in (('1x', row[3], row[4]), ('3x', row[5], row[6])):
            cfg = f'mask_rcnn_twins_{v}_{sched}'
            check(cfg, 'box AP', float(box))
            check(cfg, 'mask AP', float(mask))
            check(cfg, 'params', float(row[2]))
            check(cfg, 'flops', float(row[1]))
    for row in rows('6.8', r'^\| Twins-((?:PCPVT|SVT)-L) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| '
                           r'([\d.]+) \| ([\d.]+) \|$'):
        v = row[0].lower().replace('-', '_')
        check(f'retinanet_twins_{v}_1x', 'params', float(row[1]))
        check(f'retinanet_twins_{v}_1x', 'box AP', float(row[2]))
        check(f'mask_rcnn_twins_{v}_1x', 'params', float(row[3]))
        check(f'mask_rcnn_twins_{v}_1x', 'box AP', float(row[4]))
        check(f'mask_rcnn_twins_{v}_1x', 'mask AP', float(row[5]))
        for det in ('retinanet', 'mask_rcnn'):  # the paper has no 3x for the large models
            for key in ('box AP', 'mask AP'):
                if (models.get(f'{det}_twins_{v}_3x') or {}).get(key) is not None:
                    problems.append(f'{det}_twins_{v}_3x has a {key} the paper does not give')
    assert not problems, '\n'.join(problems)
    assert parsed == {'6.3': 6, '6.6': 4, '6.7': 4, '6.8': 2}, f'rows read: {parsed}'


# ----------------------------------------------------------------------------- wording
# Words of a development log: the project's own issue numbers, who had which machine, how
# files travelled. "InferenceSession" (onnxruntime) and "issues/123" in a URL do not match.
DEV_LOG = re.compile(
    r'\bissues?\s*#\s*\d+|\bissue\s+\d+\b|\bsessions?\b|\blent\b|\bleas(?:e|es|ed)\b'
    r'|\bcarry\b(?! a bias)|\$OUT\b|\bworkplace\b|--fetch-wheels|\bdevice tool\b',
    re.I)


def user_facing_files(root=ROOT):
    files = [root / 'README.md', root / 'setup.py', root / 'Makefile']
    files += sorted((root / 'docs').glob('*.md'))
    files += sorted((root / 'requirements').glob('*.txt'))
    files += sorted(p for p in (root / 'tools').rglob('*')
                    if p.suffix in ('.py', '.sh') and '__pycache__' not in p.parts)
    # test docstrings and comments speak to the suite's readers; test_docs.py itself holds
    # the pattern's examples
    files += sorted(p for p in (root / 'tests').rglob('*.py')
                    if p.name != 'test_docs.py' and '__pycache__' not in p.parts)
    files += sorted((root / 'twins_mm').rglob('*.py')) + sorted((root / 'configs').rglob('*.py'))
    return [f for f in files if f.is_file()]


def dev_log_lines(path):
    return [f'{path.relative_to(ROOT)}:{n}: {line.strip()}'
            for n, line in enumerate(path.read_text().splitlines(), 1) if DEV_LOG.search(line)]


def test_user_facing_text_speaks_of_the_project_only():
    hits = [hit for f in user_facing_files() for hit in dev_log_lines(f)]
    assert not hits, 'development-log wording in user-facing text:\n' + '\n'.join(hits)


@pytest.mark.parametrize('text, flagged', [
    ('the GPU run of issue #10', True),
    ('asked for in issue 11', True),
    ('no GPU was lent to the session', True),
    ('writes to $OUT/benchmark_gpu.txt', True),
    ('carry .whl/gpu to the machine', True),
    ('sess = ort.InferenceSession(path)', False),
    ('opts = ort.SessionOptions()', False),
    ('https://github.com/open-mmlab/mmcv/issues/3104', False),
    ('the PEG conv always carry a bias', False),
    ('known issues of mmseg (open-mmlab/mmsegmentation#3582)', False),
])
def test_dev_log_pattern(text, flagged):
    assert bool(DEV_LOG.search(text)) == flagged


def test_metafile_batch_and_gpus_are_the_configs():
    """Each metafile model's "Batch Size" is its config's global batch: "Training Resources"
    GPUs times the config's images per GPU, and the ``auto_scale_lr.base_batch_size`` that
    ``--auto-scale-lr`` scales from."""
    from mmengine.config import Config
    problems = []
    for rel in METAFILES:
        for m in yaml.safe_load((ROOT / rel).read_text()).get('Models', []):
            meta = m['Metadata']
            if 'Batch Size' not in meta:
                continue
            gpus = int(re.match(r'(\d+)x GPUs', meta['Training Resources'])[1])
            cfg = Config.fromfile(str(ROOT / m['Config']))
            per_gpu = cfg.train_dataloader.batch_size
            base = cfg.get('auto_scale_lr', {}).get('base_batch_size')
            if gpus * per_gpu != meta['Batch Size'] or base not in (None, meta['Batch Size']):
                problems.append(f"{m['Name']}: metafile batch {meta['Batch Size']} on {gpus} "
                                f'GPUs; config {per_gpu} per GPU, base_batch_size {base}')
    assert not problems, '\n'.join(problems)
