"""Records -> token ids and loss weights: text, prompt/completion, alpaca, chat, sharegpt.

Chat records are rendered with the tokenizer's chat template (or a built-in one) and the loss
covers exactly the assistant turns: each assistant turn's character span in the rendering is
found by rendering the conversation up to that turn, and tokens are assigned by their offsets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grain
import numpy as np

from ftjax import tokenizer as tokenizer_lib
from ftjax.data.sources import BadRecord, DataError, parse
from ftjax.tokenizer import Tokenizer

FORMATS = ('auto', 'text', 'prompt_completion', 'chat', 'sharegpt', 'alpaca', 'preference')
TrainOn = Literal['assistant', 'completion', 'all']
TEMPLATES = {
    'chatml': ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
               "{% endif %}"),
}
ALPACA = ('Below is an instruction that describes a task{with_input}. Write a response that '
          'appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n'
          '{input}### Response:\n')
_SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                   'system': 'system', 'chatgpt': 'assistant', 'bing': 'assistant'}


def detect(record: dict[str, Any]) -> str:
  if 'chosen' in record and 'rejected' in record:
    return 'preference'
  if 'messages' in record:
    return 'chat'
  if 'conversations' in record:
    return 'sharegpt'
  if 'instruction' in record and 'output' in record:
    return 'alpaca'
  if 'prompt' in record and 'completion' in record:
    return 'prompt_completion'
  if 'text' in record:
    return 'text'
  raise BadRecord('unknown_format', 'expected "text", "prompt"+"completion", "messages", '
                  '"conversations", "instruction"+"output" or "chosen"+"rejected"; '
                  f'found keys {sorted(record)}')


def _messages(value: Any, key: str) -> list[dict[str, str]]:
  try:
    return messages_of({'messages': value}, 'chat')
  except BadRecord:
    raise BadRecord('wrong_type', f'{key!r} must be a string or a list of {{"role": str, '
                    '"content": str}') from None


def _str(record: dict[str, Any], key: str) -> str:
  if key not in record:
    raise BadRecord('missing_field', f'missing field {key!r}')
  if not isinstance(record[key], str):
    raise BadRecord('wrong_type', f'field {key!r} must be a string')
  return record[key]


def messages_of(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
  """The conversation as OpenAI-style messages."""
  if fmt == 'chat':
    turns = record['messages']
    if not isinstance(turns, list) or not all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(
            m.get('content'), str) for m in turns):
      raise BadRecord('wrong_type', '"messages" must be a list of {"role": str, "content": str}')
    return [{'role': m['role'], 'content': m['content']} for m in turns]
  turns = record['conversations']
  out = []
  for m in turns if isinstance(turns, list) else [None]:
    if not isinstance(m, dict) or m.get('from') not in _SHAREGPT_ROLES or not isinstance(
        m.get('value'), str):
      raise BadRecord('wrong_type', '"conversations" must be a list of {"from": human|gpt|system, '
                      '"value": str}')
    out.append({'role': _SHAREGPT_ROLES[m['from']], 'content': m['value']})
  return out


_TOKENIZERS: dict[str, Tokenizer] = {}


def cached_tokenizer(spec: str) -> Tokenizer:
  """One tokenizer per spec and process (grain workers get the spec, not the object)."""
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = tokenizer_lib.load(spec)
  return _TOKENIZERS[spec]


@dataclasses.dataclass(frozen=True)
class Encoder:
  """Turns one record into `(ids, weights)`: weight 1 where predicting that token counts."""

  tokenizer_spec: str
  fmt: str = 'auto'
  train_on: TrainOn = 'assistant'
  chat_template: str = ''

  @property
  def tokenizer(self) -> Tokenizer:
    return cached_tokenizer(self.tokenizer_spec)

  def template(self) -> str:
    if self.chat_template:
      return TEMPLATES.get(self.chat_template, self.chat_template)
    if self.tokenizer.chat_template:
      return self.tokenizer.chat_template
    return TEMPLATES['chatml']

  def encode(self, record: Any) -> tuple[list[int], list[int]]:
    if not isinstance(record, dict):
      raise BadRecord('wrong_type', f'expected a JSON object, got {type(record).__name__}')
    fmt = detect(record) if self.fmt == 'auto' else self.fmt
    tok = self.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if fmt == 'text':
      ids = bos + tok.encode(_str(record, 'text')) + [tok.eos_id]
      return ids, [1] * len(ids)
    if fmt in ('prompt_completion', 'alpaca'):
      if fmt == 'alpaca':
        extra = record.get('input') or ''
        prompt_text = ALPACA.format(
            with_input=', paired with an input that provides further context' if extra else '',
            instruction=_str(record, 'instruction'),
            input=f'### Input:\n{extra}\n\n' if extra else '')
        completion_text = _str(record, 'output')
      else:
        prompt_text, completion_text = _str(record, 'prompt'), _str(record, 'completion')
      prompt = bos + tok.encode(prompt_text)
      completion = tok.encode(completion_text) + [tok.eos_id]
      prompt_weight = int(self.train_on == 'all')
      return prompt + completion, [prompt_weight] * len(prompt) + [1] * len(completion)
    if fmt in ('chat', 'sharegpt'):
      return self._chat(messages_of(record, fmt))
    raise BadRecord('unknown_format', f'unknown format {fmt!r}; expected one of {FORMATS}')

  def encode_pair(self, record: Any) -> tuple[tuple[list[int], list[int]], ...]:
    """A preference record -> `(ids, weights)` of prompt + chosen and of prompt + rejected;
    weight 1 exactly on the completion's tokens (never on the prompt, whatever `train_on`).

    TRL's two forms: strings `{"prompt", "chosen", "rejected"}`, or message lists, with the
    prompt a message list under `"prompt"` or else the turns chosen and rejected share.
    """
    if not isinstance(record, dict):
      raise BadRecord('wrong_type', f'expected a JSON object, got {type(record).__name__}')
    if (self.fmt if self.fmt != 'auto' else detect(record)) != 'preference':
      raise BadRecord('not_a_pair', 'expected a preference pair {"prompt", "chosen", '
                      f'"rejected"}} (objective.kind is not sft); found keys {sorted(record)}')
    chosen, rejected = record['chosen'], record['rejected']
    if isinstance(chosen, str) and isinstance(rejected, str):
      tok = self.tokenizer
      bos = [tok.bos_id] if tok.bos_id is not None else []
      prompt = bos + tok.encode(_str(record, 'prompt'))
      return tuple((prompt + tok.encode(text) + [tok.eos_id],
                    [0] * len(prompt) + [1] * (len(tok.encode(text)) + 1))
                   for text in (chosen, rejected))
    chosen, rejected = _messages(chosen, 'chosen'), _messages(rejected, 'rejected')
    if 'prompt' in record:
      prompt = _messages(record['prompt'], 'prompt')
    else:  # the shared leading turns
      n = 0
      while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
      prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not chosen or not rejected:
      raise BadRecord('empty_pair', 'the chosen or rejected answer is empty')
    return tuple(self._chat(prompt + answer, first=len(prompt)) for answer in (chosen, rejected))

  def prompt(self, record: Any, *, chat: bool = False) -> tuple[list[int], str]:
    """The ids a model continues from, tokenized as in training, and the reference answer.

    A `prompt` record (its `completion` or `reference` is the answer) becomes a user turn when
    `chat` is set; a conversation ending with an assistant turn is answered by that turn.
    """
    if not isinstance(record, dict):
      raise BadRecord('wrong_type', f'expected a JSON object, got {type(record).__name__}')
    tok = self.tokenizer
    reference = record.get('completion', record.get('reference', record.get('output', '')))
    if 'prompt' in record and chat:
      messages = [{'role': 'user', 'content': _str(record, 'prompt')}]
    elif 'prompt' in record or 'instruction' in record:
      prompt_ids, _ = self.encode({**record, 'completion': '', 'output': ''})
      return prompt_ids[:-1], str(reference)  # drop the completion's EOS
    else:
      messages = messages_of(record, detect(record))
      if messages and messages[-1]['role'] == 'assistant':
        messages, reference = messages[:-1], messages[-1]['content']
    tok = dataclasses.replace(tok, chat_template=self.template())
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text), str(reference)

  def _chat(self, messages: list[dict[str, str]], first: int = -1) -> tuple[list[int], list[int]]:
    """Rendered ids and weights: 1 on the assistant turns' tokens, or with `first` >= 0 on
    every token rendered after the first `first` turns (a preference pair's completion)."""
    tok = dataclasses.replace(self.tokenizer, chat_template=self.template())
    if first >= 0:
      full = tok.apply_chat_template(messages)
      start = len(tok.apply_chat_template(messages[:first], add_generation_prompt=True))
      if not full.startswith(tok.apply_chat_template(messages[:first])):
        raise BadRecord('template', 'the chat template does not render conversations '
                        'prefix-stably, so the completion cannot be located')
      ids, offsets = tok.encode_with_offsets(full)
      return ids, [int(s >= start) for s, _ in offsets]
    if not any(m['role'] == 'assistant' for m in messages) and self.train_on != 'all':
      raise BadRecord('no_assistant_turn', 'conversation has no assistant turn to learn from')
    full = tok.apply_chat_template(messages)
    spans = []
    for k, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      start = len(tok.apply_chat_template(messages[:k], add_generation_prompt=True))
      upto = tok.apply_chat_template(messages[: k + 1])
      if not full.startswith(upto):
        raise BadRecord('template', 'the chat template does not render conversations '
                        'prefix-stably, so assistant tokens cannot be located')
      spans.append((start, len(upto)))
    ids, offsets = tok.encode_with_offsets(full)
    if self.train_on == 'all':
      return ids, [1] * len(ids)
    starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
    inside = np.zeros(len(offsets), bool)
    for a, b in spans:
      inside |= (starts >= a) & (starts < b)
    return ids, inside.astype(int).tolist()


@dataclasses.dataclass(frozen=True)
class EncodeDoc(grain.transforms.Map):
  """A source item -> one shifted document `{tokens, targets, loss_mask}` or a skip marker.

  A skip marker is `{'skip': reason, 'where': file:line}`. Besides bad records (under
  `on_bad_record='skip'`) and too long ones (under `on_too_long='skip'`), a document is skipped
  as 'empty' (under 2 tokens) or 'no_target' (no loss-weighted target left, e.g. a prompt that
  truncation cut before its completion): such a row would train on nothing.
  """

  encoder: Encoder
  seq_len: int
  on_bad_record: str = 'error'  # error | skip
  on_too_long: str = 'truncate'  # truncate | skip | error
  pairs: bool = False  # preference pairs: one row holds prompt+chosen and prompt+rejected

  def map(self, item: dict[str, Any]) -> dict[str, Any]:
    return self.encode(item)[0]

  def encode(self, item: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The document or skip marker, and the record's token count before truncation (0 where it
    was not tokenized)."""
    where = item['where']
    length = 0
    try:
      if self.pairs:
        return self._pair(parse(item['raw']), where)
      ids, weights = self.encoder.encode(parse(item['raw']))
      length = len(ids)
      if length > self.seq_len + 1:
        if self.on_too_long == 'error':
          raise DataError(f'{where}: example has {length} tokens, more than data.seq_len+1='
                          f'{self.seq_len + 1} (data.on_too_long=error)')
        if self.on_too_long == 'skip':
          return {'skip': 'too_long', 'where': where}, length
        ids, weights = ids[: self.seq_len + 1], weights[: self.seq_len + 1]
    except BadRecord as e:
      if self.on_bad_record == 'skip':
        return {'skip': e.reason, 'where': where}, length
      raise DataError(f'{where}: {e} (set data.on_bad_record=skip to skip such records)') from None
    if len(ids) < 2:
      return {'skip': 'empty', 'where': where}, length
    if not any(weights[1:]):
      return {'skip': 'no_target', 'where': where}, length
    return {'tokens': np.asarray(ids[:-1], np.int32), 'targets': np.asarray(ids[1:], np.int32),
            'loss_mask': np.asarray(weights[1:], np.int32)}, length

  def _pair(self, record: Any, where: str) -> tuple[dict[str, Any], int]:
    """Both sequences of a pair in one document: segment 1 chosen, segment 2 rejected, each
    with its own positions. Too long, the longer completion is cut first; the prompt never."""
    seqs = [list(s) for s in self.encoder.encode_pair(record)]
    length = sum(len(ids) - 1 for ids, _ in seqs)
    if any(not any(w) for _, w in seqs):
      return {'skip': 'no_target', 'where': where}, length
    if length > self.seq_len:
      if self.on_too_long == 'error':
        raise DataError(f'{where}: the pair needs {length} positions (chosen and rejected '
                        f'together), more than data.seq_len={self.seq_len} '
                        '(data.on_too_long=error)')
      if self.on_too_long == 'skip':
        return {'skip': 'too_long', 'where': where}, length
      keep = [w.index(1) + 1 for _, w in seqs]  # the prompt and one completion token
      if sum(k - 1 for k in keep) > self.seq_len:
        return {'skip': 'prompt_too_long', 'where': where}, length
      sizes = [len(ids) for ids, _ in seqs]
      while sum(n - 1 for n in sizes) > self.seq_len:
        i = max((0, 1), key=lambda j: sizes[j] - keep[j])
        sizes[i] -= 1
      seqs = [(ids[:n], w[:n]) for (ids, w), n in zip(seqs, sizes, strict=True)]
    doc = {k: [] for k in ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')}
    for segment, (ids, weights) in enumerate(seqs, start=1):
      doc['tokens'] += ids[:-1]
      doc['targets'] += ids[1:]
      doc['loss_mask'] += weights[1:]
      doc['positions'] += list(range(len(ids) - 1))
      doc['segment_ids'] += [segment] * (len(ids) - 1)
    return {k: np.asarray(v, np.int32) for k, v in doc.items()}, length
