"""Evaluation during training (loss, perplexity, generation score, samples), W&B, plots, and
`ftjax generate` on the command line."""

import json
import os
import sys

import numpy as np
import pytest
from helpers import run_command, run_ftjax
from tensorboard.backend.event_processing import event_accumulator

from conftest import REPO, write_jsonl
from ftjax import config as config_lib
from ftjax import data, evals, generation, plot, train, trained


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_score_functions(tmp_path, monkeypatch):
  assert evals.score_function('exact_match')(' 12\n', '12') == 1.0
  assert evals.score_function('exact_match')('13', '12') == 0.0
  (tmp_path / 'my_scores.py').write_text(
      'def prefix(prediction, reference):\n  return float(prediction.startswith(reference[:1]))\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert evals.score_function('my_scores:prefix')('19', '12') == 1.0
  for bad in ('nope', 'my_scores:missing', 'no_such_module:f'):
    with pytest.raises(ValueError, match='eval.score_fn'):
      evals.score_function(bad)


def test_named_scores_each_become_a_metric():
  """A score function returning named floats (the SmolLM2 demo's validity + exact match) logs
  each, and the first is `eval_generation_score`; the demo's validity check is strict."""
  from configs import smollm2_lora
  from ftjax import models

  model = models.create(models.config_from_preset('tiny'), seed=0)
  references = ['{"name": "Ana", "age": 3, "city": "Oslo"}', 'no']
  completions = []

  def score(completion, reference):
    completions.append(completion)
    return {'valid': float(completion == completions[0]), 'exact': float(completion == reference)}

  gen = evals.GenerationEval(prompts=[[1, 2, 3], [4, 5]], references=references,
                             decode=lambda ids: ' '.join(map(str, ids)), stop_ids=[], score=score,
                             max_new_tokens=3, batch_size=2, num_samples=1)
  out = gen.run(model, None, None)
  assert len(completions) == 2 and all(len(c.split()) == 3 for c in completions)
  want_valid = (1.0 + float(completions[1] == completions[0])) / 2
  assert out['eval_generation_valid'] == out['eval_generation_score'] == want_valid
  assert out['eval_generation_exact'] == 0.0 and len(out['eval_samples']) == 1
  assert train._generation_scores({**out, 'eval_generation_valid': 0.0}, out) == {
      'valid': (0.0, want_valid), 'exact': (0.0, 0.0)}
  assert smollm2_lora.score(references[0], references[0]) == {'valid': 1.0, 'exact': 1.0}
  for bad in ('{"name": "Ana", "age": "3", "city": "Oslo"}', '{"name": "Ana", "city": "Oslo"}',
              '{"age": 3, "name": "Ana", "city": "Oslo"}', '{"name": "Ana", "age": 3, "city": '
              '"Oslo"}}', '{"name": "Ana",\n "age": 3, "city": "Oslo"}', '{"type": "json"}'):
    assert smollm2_lora.score(bad, references[0])['valid'] == 0.0, bad


def test_eval_config_is_checked(small_config, tmp_path):
  small_config.eval.update(every_steps=3)  # log_every is 2
  with pytest.raises(config_lib.ConfigError, match='eval.every_steps=3'):
    config_lib.resolve(small_config)
  small_config.eval.update(every_steps=2, generate_path=str(tmp_path / 'missing.jsonl'))
  with pytest.raises(config_lib.ConfigError, match='eval.generate_path'):
    config_lib.resolve(small_config)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A short run with loss and generation evals, logged to TensorBoard and offline W&B."""
  from configs import base

  root = tmp_path_factory.mktemp('run')
  records = [{'prompt': f'{a}+{b}=', 'completion': str(a + b)} for a in range(5) for b in range(5)]
  path = write_jsonl(root / 'train.jsonl', records)
  c = base.get_config()
  c.model.update(vocab_size=259, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8)
  c.data.update(path=path, eval_path=path, seq_len=16, global_batch=8, max_eval_examples=10)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.train.update(steps=4, log_every=2, progress=False, wandb_project='ftjax-test')
  c.eval.update(every_steps=2, generate_path=path, max_new_tokens=3, num_samples=2, batch_size=4)
  workdir = str(root / 'workdir')
  os.environ.update(WANDB_MODE='offline', WANDB_SILENT='true')
  try:
    summary = train.run(c, workdir)
  finally:
    for key in ('WANDB_MODE', 'WANDB_SILENT'):
      os.environ.pop(key)
  return workdir, summary, records


@pytest.mark.slow
def test_eval_metrics_and_samples_are_logged(trained_run):
  workdir, summary, records = trained_run
  rows = [r for r in _rows(workdir) if 'eval_loss' in r]
  assert [r['step'] for r in rows] == [0, 2, 4]
  for r in rows:
    assert r['eval_perplexity'] == pytest.approx(np.exp(r['eval_loss']), rel=1e-5)
    assert 0.0 <= r['eval_generation_score'] <= 1.0
    assert len(r['eval_samples']) == 2
    assert r['eval_samples'][0]['prompt'] == records[0]['prompt']
    assert r['eval_samples'][0]['reference'] == records[0]['completion']
    assert isinstance(r['eval_samples'][0]['completion'], str)
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard'),
      size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  events.Reload()
  assert [e.step for e in events.Scalars('eval_generation_score')] == [0, 2, 4]
  assert [e.step for e in events.Scalars('eval_perplexity')] == [0, 2, 4]
  text = events.Tensors('eval_samples/text_summary')[-1].tensor_proto.string_val[0].decode()
  assert '| prompt | completion | reference |' in text and '0+0=' in text
  offline = [d for d in os.listdir(os.path.join(workdir, 'wandb')) if d.startswith('offline-run')]
  assert len(offline) == 1, os.listdir(os.path.join(workdir, 'wandb'))
  assert summary['eval_loss_after'] < summary['eval_loss_before']


@pytest.mark.slow
def test_plot_writes_a_png(trained_run):
  workdir, _, _ = trained_run
  out = plot.plot(workdir)
  with open(out, 'rb') as f:
    png = f.read()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  width, height = int.from_bytes(png[16:20], 'big'), int.from_bytes(png[20:24], 'big')
  assert (width, height) == (800, 600) and len(png) > 10_000


def test_plot_keeps_the_last_row_of_a_step_and_needs_a_loss(tmp_path):
  # Without a run: rows as a resumed run writes them (step 3 twice; the later row wins).
  rows = [{'step': 0, 'eval_loss': 3.2}] + [
      {'step': s, 'loss': 3.0 / s, 'learning_rate': 1e-3} for s in (1, 2, 3)] + [
      {'step': 3, 'loss': 0.9, 'learning_rate': 1e-3}]
  write_jsonl(tmp_path / 'metrics.jsonl', rows)
  assert [r.get('loss') for r in plot.read_metrics(str(tmp_path))] == [None, 3.0, 1.5, 0.9]
  out = plot.plot(str(tmp_path), str(tmp_path / 'loss.png'))
  with open(out, 'rb') as f:
    png = f.read()
  assert out == str(tmp_path / 'loss.png') and png[:8] == b'\x89PNG\r\n\x1a\n'
  assert (int.from_bytes(png[16:20], 'big'), int.from_bytes(png[20:24], 'big')) == (800, 600)
  write_jsonl(tmp_path / 'metrics.jsonl', [{'step': 1, 'learning_rate': 1e-3}])
  with pytest.raises(ValueError, match='has no loss or eval_loss values yet'):
    plot.plot(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no metrics to plot'):
    plot.plot(str(tmp_path / 'missing'))


def _cli(*args):
  result = run_ftjax(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_generate_and_plot_commands_from_a_run(trained_run, tmp_path):
  workdir, _, _ = trained_run
  out = tmp_path / 'out.jsonl'
  stdout = _cli('generate', f'--workdir={workdir}', '--prompt', '1+2=', '--prompt', '3+4=',
                '--max-new-tokens', '5', f'--out={out}')
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['prompt'] for r in rows] == ['1+2=', '3+4=']
  assert all(len(r['tokens']) <= 5 and r['finish_reason'] in ('stop', 'length') for r in rows)
  assert f'--- 0\n1+2={rows[0]["completion"]}' in stdout
  # The Python API from the same checkpoint gives the same tokens.
  model, tok_spec, mesh, rules = trained.for_generation(workdir=workdir)
  tok = data.formats.cached_tokenizer(tok_spec)
  prompts = [[tok.bos_id] + tok.encode(p) for p in ('1+2=', '3+4=')]
  want = generation.complete(model, prompts, stop_ids=[tok.eos_id], mesh=mesh, rules=rules,
                             max_new_tokens=5)
  assert [r['tokens'] for r in rows] == [r['tokens'] for r in want]
  png = tmp_path / 'loss.png'
  assert f'wrote {png}' in _cli('plot', f'--workdir={workdir}', f'--out={png}')
  assert png.read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_generate_command_from_a_hf_folder_with_sampling(hf_folder, tmp_path):
  prompts = write_jsonl(tmp_path / 'prompts.jsonl', [
      {'prompt': '1+1='}, {'messages': [{'role': 'user', 'content': '2+2='}]}])
  args = ['generate', f'--pretrained={hf_folder}', f'--prompts={prompts}', '--max-new-tokens=6',
          '--temperature=0.8', '--top-k=20', '--top-p=0.9', '--seed=3', '--out=-']
  first = [json.loads(line) for line in _cli(*args).splitlines()]
  assert len(first) == 2 and all(len(r['tokens']) <= 6 for r in first)
  assert first[1]['messages'][0]['content'] == '2+2='
  again = [json.loads(line) for line in _cli(*args).splitlines()]
  assert first == again  # the seed fixes the samples


@pytest.mark.slow
def test_generate_command_on_two_processes_matches_one(trained_run):
  workdir, _, _ = trained_run
  args = ['-m', 'ftjax.main', 'generate', f'--workdir={workdir}', '--prompt=1+2=',
          '--prompt=3+4=', '--prompt=4+4=', '--max-new-tokens=5', '--out=-']
  one = [json.loads(line) for line in _cli(*args[2:]).splitlines()]
  result = run_command([sys.executable, f'{REPO}/launch/local.py', '--processes=2',
                        '--devices-per-process=2', '--timeout=120', '--', sys.executable, *args],
                       devices=None)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith('[0] {')]
  assert rows == one
  assert not any(line.startswith('[1] {') for line in result.stdout.splitlines())
