"""`ftjax export` never destroys inputs or leaves half-written folders; `ftjax generate` refuses
settings, caches and weights that cannot give meaningful tokens, before reading any weight."""

import os
import re
import shutil

import numpy as np
import pytest
from flax import nnx
from helpers import digest, run_ftjax
from safetensors.numpy import load_file, save_file

import ftjax
import ftjax.export
from ftjax import generation, train
from ftjax.models import llama

_NOT_AN_INPUT = '; choose another folder (--overwrite never replaces an input of the run)'


def _refused(result):
  """The one `ftjax: error:` line of a run that must have exited 2."""
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  return lines[0]


def _leftovers(parent):
  return [n for n in os.listdir(parent) if '.partial-' in n or '.old-' in n]


def _pretrained_lora_run(config, hf_folder, workdir):
  config.model.update(**{k: None for k in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers',
                                           'num_heads', 'num_kv_heads', 'head_dim')})
  config.model.pretrained = hf_folder
  config.data.tokenizer = ''
  config.lora.update(rank=4, alpha=8.0)
  config.train.update(steps=1, log_every=1)
  config.data.eval_path = ''  # the run only needs a checkpoint
  train.run(config, str(workdir))
  return str(workdir)


# ------------------------------------------------------------------------------------- export


def _fake_run(tmp_path):
  """A run directory and the input folders its config.json names (the paths alone matter)."""
  folders = {name: tmp_path / 'inputs' / name for name in ('base', 'adapter', 'tok')}
  for folder in folders.values():
    folder.mkdir(parents=True)
    (folder / 'file').write_text('precious')
  workdir = tmp_path / 'runs' / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  run = {'model.pretrained': str(folders['base']), 'lora.adapter': str(folders['adapter']),
         'data.tokenizer': str(folders['tok'])}
  return str(workdir), run, folders


@pytest.mark.parametrize('overwrite', [False, True])
def test_check_out_refuses_every_input_of_the_run_even_with_overwrite(tmp_path, overwrite):
  workdir, run, folders = _fake_run(tmp_path)
  os.symlink(folders['base'], tmp_path / 'link')
  cases = {
      str(folders['base']): f"is the run's base model folder (model.pretrained={folders['base']})",
      str(tmp_path / 'link'): "is the run's base model folder",  # the real path counts
      str(folders['adapter']) + '/': "is the run's PEFT adapter folder (lora.adapter=",
      str(folders['tok']): "is the run's tokenizer folder (data.tokenizer=",
      str(tmp_path / 'inputs'): "contains the run's base model folder",
      workdir: f'is the run directory (--workdir={workdir})',
      str(tmp_path / 'runs'): 'contains the run directory',
      os.path.join(workdir, 'checkpoints'): "is inside the run's checkpoints",
      os.path.join(workdir, 'checkpoints', '3', 'hf'): "is inside the run's checkpoints",
  }
  for out, reason in cases.items():
    with pytest.raises(ftjax.export.ExportError, match=re.escape(f'--out={out} {reason}')):
      ftjax.export.check_out(workdir, out, run, overwrite=overwrite)
  # A new folder, even inside the run directory or the base model folder, is fine.
  for out in (os.path.join(workdir, 'hf'), folders['base'] / 'merged', tmp_path / 'new'):
    ftjax.export.check_out(workdir, str(out), run, overwrite=overwrite)
  for folder in folders.values():
    assert (folder / 'file').read_text() == 'precious'


def test_check_out_wants_overwrite_for_a_non_empty_folder(tmp_path):
  workdir, run, _ = _fake_run(tmp_path)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'old').write_text('')
  (tmp_path / 'a_file').write_text('')
  ftjax.export.check_out(workdir, str(tmp_path / 'empty'), run, overwrite=False)
  for out in (tmp_path / 'full', tmp_path / 'a_file'):
    with pytest.raises(ftjax.export.ExportError) as e:
      ftjax.export.check_out(workdir, str(out), run, overwrite=False)
    assert str(e.value) == f'--out={out} is not empty; pass --overwrite to replace it'
    ftjax.export.check_out(workdir, str(out), run, overwrite=True)


@pytest.mark.slow
def test_export_command_replaces_only_with_overwrite_and_never_an_input(small_config, hf_folder,
                                                                       tmp_path):
  workdir = _pretrained_lora_run(small_config, hf_folder, tmp_path / 'run')
  base = digest(hf_folder)
  line = _refused(run_ftjax('export', f'--workdir={workdir}', f'--out={hf_folder}', '--overwrite'))
  assert line == (f"ftjax: error: --out={hf_folder} is the run's base model folder "
                  f'(model.pretrained={hf_folder}){_NOT_AN_INPUT}')
  line = _refused(run_ftjax('export', f'--workdir={workdir}', f'--out={tmp_path}', '--overwrite'))
  assert line == (f'ftjax: error: --out={tmp_path} contains the run directory '
                  f'(--workdir={workdir}){_NOT_AN_INPUT}')
  assert digest(hf_folder) == base

  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  line = _refused(run_ftjax('export', f'--workdir={workdir}', f'--out={out}'))
  assert line == f'ftjax: error: --out={out} is not empty; pass --overwrite to replace it'
  assert (out / 'notes.txt').read_text() == 'mine'

  result = run_ftjax('export', f'--workdir={workdir}', f'--out={out}', '--overwrite')
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (out / 'notes.txt').exists() and (out / 'model.safetensors').is_file()
  assert not _leftovers(tmp_path)
  ftjax.load_pretrained(str(out))
  assert digest(hf_folder) == base


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_keeps_the_old_folder(small_config, tmp_path,
                                                                 monkeypatch):
  small_config.train.steps, small_config.data.eval_path = 1, ''
  train.run(small_config, str(tmp_path / 'run'))  # byte tokenizer: saved after the weights
  workdir, out = str(tmp_path / 'run'), tmp_path / 'exports' / 'hf'
  out.parent.mkdir()

  def fail(*_):  # after the weights: the folder being written is half done
    partial, = (n for n in os.listdir(out.parent) if n.startswith('hf.partial-'))
    assert 'model.safetensors' in os.listdir(out.parent / partial)
    raise OSError('disk full')

  with monkeypatch.context() as patch:
    patch.setattr(ftjax.export.tokenizer, 'load', fail)
    with pytest.raises(OSError, match='disk full'):
      ftjax.export.export(workdir, str(out), dtype='float32')
    assert os.listdir(out.parent) == []  # no folder, no half-written sibling
    out.mkdir()
    (out / 'old.txt').write_text('old export')
    with pytest.raises(OSError, match='disk full'):
      ftjax.export.export(workdir, str(out), dtype='float32', overwrite=True)
    assert os.listdir(out.parent) == ['hf'] and os.listdir(out) == ['old.txt']


# ----------------------------------------------------------------------------------- generate


@pytest.mark.parametrize('settings, message', [
    (dict(temperature=-0.5), 'temperature=-0.5 must be a finite number >= 0 (0 = greedy)'),
    (dict(temperature=float('nan')), 'temperature=nan must be a finite number >= 0'),
    (dict(batch_size=0), 'batch_size=0 must be >= 1'),
    (dict(max_new_tokens=0), 'max_new_tokens=0 must be >= 1'),
    (dict(top_p=0.0), 'top_p=0.0 must be in (0, 1] (1 = no nucleus filtering)'),
    (dict(top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
    (dict(top_k=-1), 'top_k=-1 must be >= 0 (0 = all tokens)'),
])
def test_check_sampling_refuses_settings_that_make_no_sense(settings, message):
  valid = dict(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, batch_size=1)
  generation.check_sampling(**valid)
  generation.check_sampling(max_new_tokens=1, temperature=0.7, top_k=None, top_p=None)
  with pytest.raises(generation.GenerationError, match=re.escape(message)):
    generation.check_sampling(**{**valid, **settings})


def test_generate_and_complete_check_their_settings():
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  with pytest.raises(generation.GenerationError, match='temperature=-1.0'):
    ftjax.generate(model, np.ones((1, 3), np.int32), temperature=-1.0)
  with pytest.raises(generation.GenerationError, match='batch_size=0'):
    generation.complete(model, [[1, 2]], batch_size=0)


@pytest.mark.slow
@pytest.mark.parametrize('flag, line', [
    ('--temperature=-1', '--temperature=-1.0 must be a finite number >= 0 (0 = greedy)'),
    ('--batch-size=0', '--batch-size=0 must be >= 1'),
    ('--max-new-tokens=0', '--max-new-tokens=0 must be >= 1'),
    ('--top-p=0', '--top-p=0.0 must be in (0, 1] (1 = no nucleus filtering)'),
    ('--top-p=1.01', '--top-p=1.01 must be in (0, 1] (1 = no nucleus filtering)'),
    ('--top-k=-3', '--top-k=-3 must be >= 0 (0 = all tokens)'),
])
def test_generate_command_refuses_bad_settings_before_reading_the_model(tmp_path, flag, line):
  # The model folder does not exist: the settings are refused before it would be read.
  result = run_ftjax('generate', f'--pretrained={tmp_path / "missing"}', '--prompt=1+2=', flag)
  assert _refused(result) == f'ftjax: error: {line}'


def test_check_cache_fits_compares_the_cache_with_free_memory():
  cfg = llama.PRESETS['tiny']  # 2 layers, 2 kv heads of 16
  per_row = 2 * 2 * (16 + 48) * 2 * 16 * 4  # prompt bucket 16 + 48 new tokens, float32
  size = dict(prompt_length=5, max_new_tokens=48, dtype=np.float32)
  assert generation.cache_bytes(cfg, batch=3, **size) == 3 * per_row
  host = generation.Memory(free=4 * per_row, per_device=False, what='available host memory')
  generation.check_cache_fits(cfg, batch=4, memory=host, **size)
  with pytest.raises(generation.GenerationError, match=re.escape(
      'the KV cache for 5 rows of 64 positions (prompt bucket 16 + max_new_tokens 48, float32) '
      'needs 0.0 GiB, but only 0.0 GiB of available host memory is free: lower '
      'max_new_tokens or batch_size')):
    generation.check_cache_fits(cfg, batch=5, memory=host, **size)
  # On a device only its batch shard counts; 3 rows on 2 shards are padded to 4.
  device = generation.Memory(free=2 * per_row, per_device=True, what='tpu device memory')
  generation.check_cache_fits(cfg, batch=3, batch_shards=2, memory=device, **size)
  with pytest.raises(generation.GenerationError, match='5 rows .* GiB per device'):
    generation.check_cache_fits(cfg, batch=5, batch_shards=5, memory=device,
                                **{**size, 'max_new_tokens': 200})


def test_generate_command_refuses_a_kv_cache_larger_than_memory(hf_folder):
  # 10^12 new tokens: terabytes of keys and values on any machine.
  line = _refused(run_ftjax('generate', f'--pretrained={hf_folder}', '--prompt=1+2=',
                       '--max-new-tokens=1000000000000'))
  assert re.fullmatch(
      r'ftjax: error: the KV cache for 1 rows of 1000000000016 positions \(prompt bucket 16 \+ '
      r'--max-new-tokens 1000000000000, float32\) needs [\d.]+ GiB, but only [\d.]+ GiB of '
      r'available host memory is free: lower --max-new-tokens or --batch-size', line), line


def test_check_finite_names_the_parameters_that_are_not():
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  generation.check_finite(model, 'a clean model')
  w = model.blocks.mlp.up.w
  w.set_value(w.get_value().at[1, 0, 0].set(np.inf))
  with pytest.raises(generation.GenerationError, match=re.escape(
      'the weights of model X contain NaN or inf (in blocks.mlp.up.w): ')):
    generation.check_finite(model, 'model X')


@pytest.mark.slow
def test_generate_command_refuses_weights_with_nan(hf_folder, tmp_path):
  args = ['--prompt=1+2=', '--max-new-tokens=2']
  assert run_ftjax('generate', f'--pretrained={hf_folder}', *args).returncode == 0
  poisoned = str(tmp_path / 'poisoned')
  shutil.copytree(hf_folder, poisoned)
  tensors = load_file(os.path.join(poisoned, 'model.safetensors'))
  name = 'model.layers.1.mlp.down_proj.weight'
  tensors[name] = tensors[name].copy()
  tensors[name][0, 0] = np.nan
  save_file(tensors, os.path.join(poisoned, 'model.safetensors'), metadata={'format': 'pt'})
  line = _refused(run_ftjax('generate', f'--pretrained={poisoned}', *args))
  assert line == (f'ftjax: error: the weights of --pretrained={poisoned} contain NaN or inf '
                  '(in blocks.mlp.down.w): the tokens would be garbage; check the checkpoint or '
                  'the run that made it')


@pytest.mark.slow
def test_generate_command_refuses_more_tokens_than_the_model_context(hf_folder):
  # The tiny checkpoint says max_position_embeddings=256.
  line = _refused(run_ftjax('generate', f'--pretrained={hf_folder}', '--prompt=1+2=',
                       '--max-new-tokens=300'))
  assert re.fullmatch(
      r'ftjax: error: the longest prompt \(\d+ tokens\) \+ --max-new-tokens 300 = \d+ tokens '
      rf'exceeds the 256-token context of {re.escape(hf_folder)} \(max_position_embeddings\): '
      r'shorten the prompt or lower --max-new-tokens', line), line
  assert run_ftjax('generate', f'--pretrained={hf_folder}', '--prompt=1+2=',
              '--max-new-tokens=4').returncode == 0
