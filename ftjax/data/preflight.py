"""A cheap check of the training data before the first step: parse everything, encode a sample.

Training reads records lazily, so without this a bad line 3000 lines in, or a seq_len that
leaves no record anything to learn, shows up only after the model is built and compiled.
"""

from __future__ import annotations

import collections
import dataclasses

import grain
import numpy as np

from ftjax.data import formats
from ftjax.data.pipeline import Options, Source
from ftjax.data.sources import BadRecord, DataError, kind_of, open_records, parse

# Sources whose records are all parsed up front; the others (ArrayRecord, TFDS) are only sampled.
_PARSED_KINDS = ('jsonl', 'json', 'parquet')


@dataclasses.dataclass
class SourceReport:
  """What preflight found in one source.

  Attributes:
    path: the source's path.
    records: how many records it holds.
    parsed: whether every record was parsed (JSONL, JSON, Parquet) or only the sample.
    bad: records the full parse found bad, by reason (only under on_bad_record=skip; under
      error the first one raises).
    encoded: how many sampled records were tokenized.
    truncated: sampled records longer than seq_len+1 that were cut (on_too_long=truncate).
    skipped: sampled records that training would skip, by reason.
  """

  path: str
  records: int
  parsed: bool
  bad: collections.Counter[str]
  encoded: int
  truncated: int
  skipped: collections.Counter[str]

  @property
  def usable(self) -> int:
    """Sampled records that become a training document."""
    return self.encoded - sum(self.skipped.values())

  def summary_line(self) -> str:
    how = 'parsed all' if self.parsed else 'sampled'
    if self.bad:
      how += f', {sum(self.bad.values())} bad ({_reasons(self.bad, " ")})'
    line = f'{self.path}: {self.records} records ({how}), {self.encoded} encoded: '
    line += f'{self.truncated} truncated ({100 * self.truncated / max(self.encoded, 1):.1f}%), '
    line += f'{sum(self.skipped.values())} skipped'
    return line + (f' ({_reasons(self.skipped, " ")})' if self.skipped else '')


@dataclasses.dataclass
class Report:
  """What preflight found in every source; `summary_line()` is one line for the run's log."""

  sources: list[SourceReport]

  def summary_line(self) -> str:
    return 'data: ' + '; '.join(s.summary_line() for s in self.sources)


def _reasons(counts: collections.Counter[str], sep: str) -> str:
  return ', '.join(f'{reason}{sep}{n}' for reason, n in counts.most_common())


def _hint(reason: str, options: Options) -> str:
  """Why every record skipped for `reason` is skipped, and what to change."""
  n = options.seq_len
  hints = {
      'no_target': f'a prompt longer than data.seq_len={n} leaves no target token after '
                   f'truncation; raise data.seq_len or set data.train_on=all',
      'too_long': f'every record is longer than data.seq_len+1={n + 1} and '
                  'data.on_too_long=skip; raise data.seq_len or set data.on_too_long=truncate',
      'no_assistant_turn': 'the conversations have no assistant turn; set data.train_on=all',
      'empty': 'the records encode to fewer than 2 tokens',
      'bad_json': 'the lines are not JSON; check the file',
      'bad_utf8': 'the file is not UTF-8 text; check the file',
      'template': 'the chat template is not prefix-stable; try data.chat_template=chatml',
      'prompt_too_long': f'the prompts alone (twice: chosen and rejected share a row) fill '
                         f'data.seq_len={n}; raise data.seq_len',
      'not_a_pair': 'objective.kind is a preference objective but the records are not '
                    '{"prompt", "chosen", "rejected"} pairs; use objective.kind=sft',
      'empty_pair': 'the chosen or rejected answers are empty',
  }
  return hints.get(reason, 'the records do not match the source format (text, prompt+completion, '
                           'messages, conversations or instruction+output); check the file')


def _parse_all(source: Source, records: grain.sources.RandomAccessDataSource,
               options: Options) -> collections.Counter[str]:
  """Parses every record (no tokenizing): the first bad one raises under on_bad_record=error."""
  bad: collections.Counter[str] = collections.Counter()
  for i in range(len(records)):
    item = records[i]
    try:
      record = parse(item['raw'])
      if not isinstance(record, dict):
        raise BadRecord('wrong_type', f'expected a JSON object, got {type(record).__name__}')
      if source.format == 'auto':
        formats.detect(record)
    except BadRecord as e:
      if options.on_bad_record != 'skip':
        raise DataError(f"{item['where']}: {e} (set data.on_bad_record=skip to skip such "
                        'records)') from None
      bad[e.reason] += 1
  return bad


def preflight(sources: list[Source], options: Options, *, sample: int = 512) -> Report:
  """Checks the training data cheaply, before any batch is built.

  JSONL, JSON and Parquet sources have every record parsed (UTF-8 and JSON, no tokenizing);
  ArrayRecord and TFDS sources only have their sample checked. Of every source, `sample`
  records, evenly spaced (files are often sorted by length or origin), are encoded as training
  encodes them, counting truncated and skipped records.

  Args:
    sources: the training sources (`config.train_sources(config.data)`).
    options: how records become rows (`config.data_options(config)`).
    sample: the most records encoded per source.

  Returns:
    The counts per source; `Report.summary_line()` is one line.

  Raises:
    DataError: a source is missing or empty; a record is bad under data.on_bad_record=error
      (or too long under data.on_too_long=error), naming its file and line; or every sampled
      record of every source would be skipped, naming the reason.
  """
  reports = []
  for source in sources:
    records = open_records(source.path, split=source.split, tfds_data_dir=options.tfds_data_dir)
    if len(records) == 0:
      raise DataError(f'{source.path}: no records')
    parsed = kind_of(source.path) in _PARSED_KINDS
    bad = _parse_all(source, records, options) if parsed else collections.Counter()
    encode = options.encode_doc(source.format)
    picks = np.unique(np.linspace(0, len(records) - 1, min(sample, len(records))).astype(int))
    truncated, skipped = 0, collections.Counter()
    for i in picks.tolist():
      doc, length = encode.encode(records[i])
      if 'skip' in doc:
        skipped[doc['skip']] += 1
      elif length > options.seq_len + 1:
        truncated += 1
    reports.append(SourceReport(source.path, len(records), parsed, bad, len(picks), truncated,
                                skipped))
  if reports and all(r.encoded and not r.usable for r in reports):
    skipped = sum((r.skipped for r in reports), collections.Counter())
    total = sum(r.encoded for r in reports)
    paths = ', '.join(r.path for r in reports)
    raise DataError(f'data: all {total} sampled records of {paths} were skipped '
                    f'({_reasons(skipped, ": ")}): {_hint(skipped.most_common(1)[0][0], options)}')
  return Report(reports)
