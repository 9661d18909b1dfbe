"""`ftjax data audit`: what the training data is, before a pod is spent on it.

One pass over every training source, read, parsed, tokenized and encoded exactly as the run
would (same formats, tokenizer, chat template, `train_on`, `seq_len`), finds: bad records with
file:line and reason, conversation-structure anomalies, exact and near duplicates across the
whole mixture, contradictions (one prompt, different answers), held-out examples whose 13-grams
occur in the training data, and the token statistics the run will see. `write` puts the report
in a folder as report.json, report.md and PNG histograms.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np

from ftjax.data import dedup, filters, formats
from ftjax.data.pipeline import Options, Source
from ftjax.data.sources import BadRecord, open_records, parse

EXAMPLES = 5  # examples kept per finding
KNOWN_ROLES = ('system', 'user', 'assistant', 'tool')
# Skip reasons that mean the record itself is unusable (not merely too long).
RECORD_REASONS = ('wrong_type', 'missing_field', 'unknown_format', 'no_assistant_turn',
                  'template', 'not_a_pair', 'empty_pair', 'bad_json', 'bad_utf8', 'empty',
                  'no_target')


def structure(messages: list[dict[str, str]]) -> list[str]:
  """What is odd about a conversation's turns (empty list: nothing)."""
  found = []
  roles = [m['role'] for m in messages]
  if any(r not in KNOWN_ROLES for r in roles):
    found.append('unknown_role')
  talk = [r for r in roles if r != 'system']
  if talk and talk[0] == 'assistant':
    found.append('starts_with_assistant')
  if any(a == b for a, b in zip(talk, talk[1:], strict=False)):
    found.append('same_role_twice')
  if any(m['role'] == 'assistant' and not m['content'].strip() for m in messages):
    found.append('empty_answer')
  if any(r == 'system' for r in roles[1:]):
    found.append('system_not_first')
  return found


@dataclasses.dataclass
class _Finding:
  """A count and its first examples."""

  count: int = 0
  examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def add(self, **example: Any) -> None:
    self.count += 1
    if len(self.examples) < EXAMPLES:
      self.examples.append(example)

  def json(self, total: int) -> dict[str, Any]:
    return {'count': self.count, 'share': self.count / max(total, 1), 'examples': self.examples}


class _Scan:
  """Everything one pass over the training records accumulates."""

  def __init__(self, options: Options):
    self.options = options
    self.dedup = dedup.Deduper()
    self.where: list[str] = []  # of each record the deduper saw
    self.duplicates, self.near_duplicates = _Finding(), _Finding()
    self.bad = _Finding()
    self.bad_reasons: collections.Counter[str] = collections.Counter()
    self.structure: dict[str, _Finding] = collections.defaultdict(_Finding)
    self.held_out = dedup.HeldOut([])
    self.sources: list[dict[str, Any]] = []
    self.lengths: list[int] = []
    self.turns: list[int] = []

  def source(self, source: Source) -> None:
    records = open_records(source.path, split=source.split,
                           tfds_data_dir=self.options.tfds_data_dir)
    # Skips are counted, never raised: the audit reports what the run would stop or skip on.
    encode = dataclasses.replace(self.options, on_bad_record='skip',
                                 on_too_long=('skip' if self.options.on_too_long == 'skip'
                                              else 'truncate')).encode_doc(source.format)
    rep: dict[str, Any] = dict(path=source.path, weight=source.weight, records=len(records),
                               formats=collections.Counter(), bad=collections.Counter(),
                               skipped=collections.Counter(), tokens=0, loss_tokens=0,
                               documents=0, over_seq_len=0, truncated_tokens=0, lengths=[])
    limit = self.options.seq_len + 1
    for i in range(len(records)):
      item = records[i]
      where = item['where']
      try:
        record = parse(item['raw'])
        if not isinstance(record, dict):
          raise BadRecord('wrong_type', f'expected a JSON object, got {type(record).__name__}')
        fmt = formats.detect(record) if source.format == 'auto' else source.format
        prompt, answer = dedup.parts(record, fmt)
      except BadRecord as e:
        rep['bad'][e.reason] += 1
        self.bad_reasons[e.reason] += 1
        self.bad.add(where=where, reason=e.reason, detail=str(e))
        continue
      rep['formats'][fmt] += 1
      if fmt in ('chat', 'sharegpt'):
        messages = formats.messages_of(record, fmt)
        self.turns.append(len(messages))
        for kind in structure(messages):
          self.structure[kind].add(where=where)
      self._dedup(prompt, answer, where)
      doc, length = encode.encode(item)
      if 'skip' in doc:
        rep['skipped'][doc['skip']] += 1
        if doc['skip'] in RECORD_REASONS:
          self.bad_reasons[doc['skip']] += 1
          self.bad.add(where=where, reason=doc['skip'], detail='')
          rep['bad'][doc['skip']] += 1
        if doc['skip'] == 'too_long':
          rep['over_seq_len'] += 1
        continue
      rep['lengths'].append(length)
      rep['documents'] += 1
      rep['tokens'] += len(doc['tokens'])
      rep['loss_tokens'] += int(doc['loss_mask'].sum())
      if length > limit:
        rep['over_seq_len'] += 1
        rep['truncated_tokens'] += length - limit
    self.lengths += rep['lengths']
    self.sources.append(rep)

  def _dedup(self, prompt: str, answer: str, where: str) -> None:
    of = self.dedup.add(prompt, answer)
    self.where.append(where)
    if of is None:
      self.held_out.mark(f'{prompt} {answer}')
    else:
      self.duplicates.add(where=where, duplicate_of=self.where[of])

  def finish(self) -> None:
    """Near duplicates, found in batch once every record is in."""
    for record, of in sorted(self.dedup.near().items()):
      self.near_duplicates.add(where=self.where[record], near_duplicate_of=self.where[of])

  def contradictions(self) -> tuple[_Finding, int]:
    """Prompts with answers that differ (not near duplicates of each other), and how many
    records those prompts hold."""
    found, records = _Finding(), 0
    for first, differing in self.dedup.contradictions():
      found.add(where=self.where[first],
                conflicts_with=[self.where[i] for i in differing[:EXAMPLES]])
      records += 1 + len(differing)
    return found, records


def _packing(lengths: list[int], seq_len: int, bins: int) -> float:
  """Tokens / row capacity of first-fit packing over `bins` open rows (as the pipeline packs)."""
  if not lengths:
    return 0.0
  open_rows: list[int] = []
  rows = 0
  for n in lengths:
    n = min(n - 1, seq_len)
    fit = next((i for i, used in enumerate(open_rows) if used + n <= seq_len), None)
    if fit is None:
      if len(open_rows) == bins:
        open_rows.pop(int(np.argmax(open_rows)))
        rows += 1
      open_rows.append(n)
    else:
      open_rows[fit] += n
  rows += len(open_rows)
  return sum(min(n - 1, seq_len) for n in lengths) / (rows * seq_len)


def _quantiles(values: list[int]) -> dict[str, float]:
  if not values:
    return {}
  q = np.percentile(np.asarray(values), [0, 50, 90, 99, 100])
  return dict(zip(('min', 'p50', 'p90', 'p99', 'max'), (float(v) for v in q), strict=True))


def audit(sources: list[Source], options: Options, *, held_out: list[str], pack: bool,
          batch: int) -> dict[str, Any]:
  """The report (a JSON-able dict) on `sources` as a run with `options` would read them, with
  `held_out` files checked for contamination."""
  scan = _Scan(options)
  examples = [(p, w, t) for p in held_out for w, t in filters.held_out_texts(p, options)]
  scan.held_out = dedup.HeldOut([t for _, _, t in examples])
  for source in sources:
    scan.source(source)
  scan.finish()
  total = sum(s['records'] for s in scan.sources)
  usable = total - scan.bad.count
  contradictions, conflicting = scan.contradictions()
  hits = scan.held_out.hit.tolist()
  contamination = _Finding()
  by_file: collections.Counter[str] = collections.Counter()
  for (path, where, _), hit in zip(examples, hits, strict=True):
    if hit:
      contamination.add(where=where)
      by_file[path] += 1
  seq_len = options.seq_len
  documents = sum(s['documents'] for s in scan.sources)
  tokens = sum(s['tokens'] for s in scan.sources)
  weights = sum(s['weight'] for s in scan.sources) or 1.0
  over = sum(s['over_seq_len'] for s in scan.sources)
  skipped = sum((s['skipped'] for s in scan.sources), collections.Counter())
  return {
      'records': {'total': total, 'usable': usable,
                  'by_format': dict(sum((s['formats'] for s in scan.sources),
                                        collections.Counter()))},
      'bad_records': {**scan.bad.json(total), 'by_reason': dict(scan.bad_reasons)},
      'structure': {k: f.json(total) for k, f in sorted(scan.structure.items())},
      'duplicates': scan.duplicates.json(total),
      'near_duplicates': {**scan.near_duplicates.json(total), 'threshold': dedup.THRESHOLD,
                          'shingle_chars': dedup.SHINGLE, 'num_perm': dedup.NUM_PERM},
      'contradictions': {**contradictions.json(total), 'records': conflicting},
      'contamination': {**contamination.json(len(examples)), 'held_out': len(examples),
                        'ngram': dedup.NGRAM, 'by_file': dict(by_file), 'files': held_out},
      'tokens': {
          'seq_len': seq_len, 'documents': documents, 'tokens': tokens,
          'lengths': _quantiles(scan.lengths),
          'over_seq_len': over, 'over_seq_len_share': over / max(usable, 1),
          'truncated_tokens': sum(s['truncated_tokens'] for s in scan.sources),
          'on_too_long': options.on_too_long, 'skipped': dict(skipped),
          'loss_token_share': sum(s['loss_tokens'] for s in scan.sources) / max(tokens, 1),
          'packing_efficiency': (_packing(scan.lengths, seq_len, max(batch, 8)) if pack
                                 else tokens / max(documents * seq_len, 1)),
          'packed': pack,
      },
      'sources': [{
          'path': s['path'], 'records': s['records'], 'weight': s['weight'],
          'mixture_share': s['weight'] / weights, 'records_share': s['records'] / max(total, 1),
          'tokens': s['tokens'], 'formats': dict(s['formats']), 'bad': dict(s['bad']),
          'skipped': dict(s['skipped']), 'lengths': _quantiles(s['lengths']),
      } for s in scan.sources],
      '_lengths': scan.lengths, '_turns': scan.turns,  # for the histograms; not in report.json
  }


def violations(report: dict[str, Any], thresholds: Any) -> list[str]:
  """One line per threshold (`audit.*`) the report exceeds."""
  t = thresholds
  checks = [
      ('max_bad_record_share', report['bad_records']['share'], 'bad records'),
      ('max_duplicate_share', report['duplicates']['share'], 'exact duplicates'),
      ('max_near_duplicate_share', report['near_duplicates']['share'], 'near duplicates'),
      ('max_contradiction_share', report['contradictions']['records']
       / max(report['records']['total'], 1), 'records in contradictions'),
      ('max_contamination', report['contamination']['share'], 'held-out examples contaminated'),
      ('max_truncated_share', report['tokens']['over_seq_len_share'],
       f'records longer than data.seq_len+1={report["tokens"]["seq_len"] + 1}'),
  ]
  return [f'audit.{key}={getattr(t, key)}: {value:.4f} {what}' for key, value, what in checks
          if value > getattr(t, key)]


def write(report: dict[str, Any], out: str, failed: list[str]) -> None:
  """report.json, report.md and the PNG histograms in `out`."""
  os.makedirs(out, exist_ok=True)
  lengths, turns = report['_lengths'], report['_turns']
  body = {k: v for k, v in report.items() if not k.startswith('_')}
  body['strict'] = {'violations': failed}
  tmp = os.path.join(out, '.report.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(body, f, indent=2, ensure_ascii=False)
  os.replace(tmp, os.path.join(out, 'report.json'))
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(markdown(body))
  _plots(report, lengths, turns, out)


def markdown(r: dict[str, Any]) -> str:
  """The report as a page a person reads."""
  total = r['records']['total']
  lines = ['# Data audit', '', f"{total} records, {r['records']['usable']} usable; formats: "
           + ', '.join(f'{k} {v}' for k, v in sorted(r['records']['by_format'].items())), '',
           '| finding | count | share | first examples |', '|---|---|---|---|']

  def row(name, finding, share=None):
    ex = '; '.join(', '.join(f'{k}={v}' for k, v in e.items()) for e in finding['examples'][:3])
    share = finding['share'] if share is None else share
    lines.append(f"| {name} | {finding['count']} | {share:.2%} | {ex} |")

  row('bad records', r['bad_records'])
  for kind, finding in r['structure'].items():
    row(f'structure: {kind}', finding)
  row('exact duplicates', r['duplicates'])
  row('near duplicates', r['near_duplicates'])
  row('contradictory prompts', r['contradictions'])
  row(f"contaminated held-out ({r['contamination']['held_out']} checked)", r['contamination'])
  t = r['tokens']
  lines += ['', '## Tokens', '', f"seq_len {t['seq_len']}; document lengths {t['lengths']}",
            f"{t['over_seq_len']} records over seq_len+1 ({t['on_too_long']}), "
            f"{t['truncated_tokens']} tokens cut; loss on {t['loss_token_share']:.1%} of tokens; "
            f"packing efficiency {t['packing_efficiency']:.1%}", '', '## Sources', '',
            '| source | records | mixture share | tokens | bad |', '|---|---|---|---|---|']
  for s in r['sources']:
    lines.append(f"| {s['path']} | {s['records']} | {s['mixture_share']:.1%} | {s['tokens']} | "
                 f"{sum(s['bad'].values())} |")
  if r['strict']['violations']:
    lines += ['', '## Thresholds exceeded', ''] + [f'- {v}' for v in r['strict']['violations']]
  return '\n'.join(lines) + '\n'


def _plots(report: dict[str, Any], lengths: list[int], turns: list[int], out: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  seq_len = report['tokens']['seq_len']
  for name, values, xlabel, line in (('lengths.png', lengths, 'tokens per record', seq_len + 1),
                                     ('turns.png', turns, 'turns per conversation', None)):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values:
      ax.hist(values, bins=min(50, max(len(set(values)), 1)))
    if line:
      ax.axvline(line, color='red', linestyle='--', label=f'data.seq_len+1 = {line}')
      ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel('records')
    fig.tight_layout()
    fig.savefig(os.path.join(out, name))
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  names = [os.path.basename(s['path']) for s in report['sources']]
  x = np.arange(len(names))
  ax.bar(x - 0.2, [s['mixture_share'] for s in report['sources']], 0.4, label='mixture weight')
  ax.bar(x + 0.2, [s['records_share'] for s in report['sources']], 0.4, label='records')
  ax.set_xticks(x, names, rotation=20, ha='right')
  ax.set_ylabel('share')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'sources.png'))
  plt.close(fig)


def run(config: Any, *, source: str | None, out: str, strict: bool) -> int:
  """`ftjax data audit`: audits the run's training sources (or one `source` file, read with the
  run's tokenizer and settings), writes the report to `out`, prints a summary; returns the exit
  code (1 under `strict` when a threshold is exceeded)."""
  import ml_collections

  from ftjax import config as config_lib
  from ftjax import schema

  config = config if config is not None else ml_collections.ConfigDict(schema.defaults())
  if source:
    config.data.update(path=source, sources=[])
  r = config_lib.resolve(config, check_files=True)
  held_out = [s.path for s in r.data.eval_sources]
  if r.eval.generate_path and r.eval.generate_path not in held_out:
    held_out.append(r.eval.generate_path)
  report = audit(list(r.data.sources), r.data.options, held_out=held_out, pack=r.data.pack,
                 batch=r.data.global_batch)
  failed = violations(report, r.audit)
  write(report, out, failed)
  rec, tok = report['records'], report['tokens']
  print(f"audit: {rec['total']} records ({rec['usable']} usable), bad "
        f"{report['bad_records']['count']}, duplicates {report['duplicates']['count']}, near "
        f"duplicates {report['near_duplicates']['count']}, contradictory prompts "
        f"{report['contradictions']['count']}, contaminated held-out "
        f"{report['contamination']['count']}/{report['contamination']['held_out']}, over "
        f"seq_len {tok['over_seq_len']}, packing {tok['packing_efficiency']:.1%} -> "
        f"{os.path.join(out, 'report.md')}")
  for line in failed:
    print(f'audit: threshold exceeded: {line}')
  return 1 if strict and failed else 0
