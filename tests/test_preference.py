"""Preference objectives (DPO, IPO, SimPO, ORPO) checked against TRL on the same tiny model."""

import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import write_jsonl

from configs import base as base_config
from ftjax import config as config_lib
from ftjax import data, objectives, peft_io, sharding
from ftjax import step as step_lib
from ftjax import trainer as trainer_lib

PAIRS = [{'prompt': f'{a}+{b}=', 'chosen': str(a + b),
          'rejected': str(a + b + (1 if a % 2 else 11))}
         for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (0, 7), (5, 2), (7, 7)]]
TRL_NAMES = dict(rewards_chosen='rewards/chosen', rewards_rejected='rewards/rejected',
                 reward_margin='rewards/margins', reward_accuracy='rewards/accuracies',
                 logps_chosen='logps/chosen', logps_rejected='logps/rejected')


def _ours(hf_folder, adapter, pairs_path, kind, **objective):
  c = base_config.get_config()
  c.model.pretrained = hf_folder
  c.lora.adapter = adapter
  c.objective.update(kind=kind, **objective)
  c.data.update(path=pairs_path, seq_len=16, global_batch=len(PAIRS))
  r = config_lib.resolve(c)
  trainer = trainer_lib.from_resolved(r)
  rows = data.eval_batches(list(r.data.sources), r.data.options, global_batch=len(PAIRS))
  batch = data.to_global(rows[0], trainer.batch_sharding)
  with sharding.use(trainer.mesh, trainer.rules):
    norm = jax.jit(objectives.normalizers, static_argnums=0)(r.objective, batch)
    grads_fn = jax.jit(lambda p, f, b, n: step_lib.loss_grads(
        p, f, b, n, graphdef=trainer.graphdef, objective=r.objective))
    grads, loss, metrics = grads_fn(trainer.state.params, trainer.frozen, batch, norm)
    _, step_metrics = trainer.train_step(trainer.state, trainer.frozen, batch, trainer.ref)
  return trainer, rows[0], grads, float(loss), jax.device_get(metrics), jax.device_get(step_metrics)


def _peft_named(trainer, grads, out_dir):
  """Our adapter gradients under PEFT's tensor names (written by our own PEFT exporter)."""
  from flax import nnx
  from safetensors.numpy import load_file

  peft_io.save(nnx.merge(trainer.graphdef, grads, trainer.frozen), out_dir)
  return load_file(os.path.join(out_dir, 'adapter_model.safetensors'))


def _trl_dpo(hf_folder, adapter, kind, tmp_path, **kwargs):
  import datasets
  import trl

  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
  args = trl.DPOConfig(output_dir=str(tmp_path / 'trl'), per_device_train_batch_size=len(PAIRS),
                       loss_type=[kind], report_to='none', use_cpu=True, max_length=None,
                       dataloader_num_workers=0, bf16=False, **kwargs)  # float32 throughout
  # The reference is the base without adapters (TRL would copy a loaded adapter as "ref").
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
  trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                           train_dataset=datasets.Dataset.from_list(PAIRS))
  batch = next(iter(trainer.get_train_dataloader()))
  trainer.model.train()
  loss = trainer.compute_loss(trainer.model, batch)
  loss.backward()
  grads = {n.replace('.default', ''): p.grad.float().numpy() for n, p in
           trainer.model.named_parameters() if p.grad is not None}
  metrics = {k: v[-1] for k, v in trainer._metrics['train'].items()}
  return float(loss.detach()), grads, metrics, batch


@pytest.mark.slow
@pytest.mark.parametrize('kind,trl_kind', [('dpo', 'sigmoid'), ('ipo', 'ipo')])
def test_loss_rewards_and_gradients_equal_trl(bos_folder, policy_adapter, tmp_path, kind,
                                              trl_kind):
  hf_folder = bos_folder
  pairs_path = write_jsonl(tmp_path / 'pairs.jsonl', PAIRS)
  trainer, rows, grads, loss, metrics, step_metrics = _ours(hf_folder, policy_adapter, pairs_path,
                                                            kind, beta=0.3)
  want_loss, want_grads, want, batch = _trl_dpo(hf_folder, policy_adapter, trl_kind, tmp_path,
                                                beta=0.3)
  # The same sequences: TRL's prompt + completion ids are our rows' chosen/rejected segments.
  theirs = sorted(tuple(int(t) for t, m in zip(ids, mask, strict=True) if m) for ids, mask in
                  zip(batch['input_ids'], batch['attention_mask'], strict=True))
  ours = sorted(tuple(int(t) for t in np.append(row[seg == k], tgt[seg == k][-1]))
                for row, tgt, seg in zip(rows['tokens'], rows['targets'], rows['segment_ids'],
                                         strict=True)
                for k in (1, 2))
  assert ours == theirs
  assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  assert float(step_metrics['loss']) == pytest.approx(loss, rel=1e-6)
  for name, trl_name in TRL_NAMES.items():
    assert float(metrics[name]) == pytest.approx(want[trl_name], rel=1e-4, abs=1e-5), name
    assert float(step_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-6, abs=1e-7)
  assert 0.0 < float(metrics['reward_accuracy']) < 1.0 or abs(metrics['reward_margin']) > 1e-3
  named = _peft_named(trainer, grads, str(tmp_path / 'grads'))
  assert sorted(named) == sorted(want_grads)
  scale = max(np.max(np.abs(g)) for g in want_grads.values())
  assert scale > 1e-4  # the gradients are not trivially zero
  for name, g in want_grads.items():
    np.testing.assert_allclose(named[name], g, atol=2e-5 * scale, err_msg=name)



def _trl_experimental(hf_folder, adapter, kind, tmp_path):
  """One batch of TRL's CPO trainer (SimPO) or ORPO trainer: loss, metrics, adapter grads."""
  import datasets
  from trl.experimental import cpo, orpo

  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
  common = dict(per_device_train_batch_size=len(PAIRS), report_to='none', use_cpu=True,
                bf16=False, max_length=64, dataloader_num_workers=0)
  if kind == 'simpo':  # pure SimPO: no NLL term
    args = cpo.CPOConfig(output_dir=str(tmp_path / 'cpo'), loss_type='simpo', cpo_alpha=0.0,
                         beta=2.0, simpo_gamma=0.5, label_smoothing=0.1, **common)
    trainer = cpo.CPOTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(PAIRS))
  else:
    args = orpo.ORPOConfig(output_dir=str(tmp_path / 'orpo'), beta=0.2, **common)
    trainer = orpo.ORPOTrainer(model=model, args=args, processing_class=tokenizer,
                               train_dataset=datasets.Dataset.from_list(PAIRS))
  batch = next(iter(trainer.get_train_dataloader()))
  trainer.model.train()
  loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, 'train')
  loss.backward()
  grads = {n.replace('.default', ''): p.grad.float().numpy() for n, p in
           trainer.model.named_parameters() if p.grad is not None}
  return float(loss.detach()), grads, {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['simpo', 'orpo'])
def test_reference_free_losses_equal_trl(bos_folder, policy_adapter, tmp_path, kind):
  pairs_path = write_jsonl(tmp_path / 'pairs.jsonl', PAIRS)
  objective = (dict(beta=2.0, gamma=0.5, label_smoothing=0.1) if kind == 'simpo'
               else dict(lambda_=0.2))
  trainer, _, grads, loss, metrics, _ = _ours(bos_folder, policy_adapter, pairs_path, kind,
                                              **objective)
  want_loss, want_grads, want = _trl_experimental(bos_folder, policy_adapter, kind, tmp_path)
  for name, trl_name in TRL_NAMES.items():
    assert float(metrics[name]) == pytest.approx(want[trl_name], rel=1e-4, abs=1e-5), name
  if kind == 'orpo':
    assert float(metrics['log_odds_ratio']) == pytest.approx(want['log_odds_ratio'], rel=1e-4)
    assert float(metrics['nll_chosen']) == pytest.approx(want['nll_loss'], rel=1e-5)
  assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  named = _peft_named(trainer, grads, str(tmp_path / 'grads'))
  scale = max(np.max(np.abs(g)) for g in want_grads.values())
  assert scale > 1e-4
  for name, g in want_grads.items():
    np.testing.assert_allclose(named[name], g, atol=2e-5 * scale, err_msg=name)

def test_pair_losses_match_their_definitions():
  """Each loss, by hand, on fixed log-probabilities (the TRL comparison is the slow test)."""
  logps = jax.numpy.array([[-3.0, -5.0], [-4.0, -2.0]])
  counts = jax.numpy.array([[2.0, 4.0], [1.0, 1.0]])
  ref = jax.numpy.array([[-3.5, -4.0], [-4.0, -3.0]])
  norm = dict(pairs=jax.numpy.float32(2.0), tokens=jax.numpy.float32(3.0),
              chosen_positions=jax.numpy.float32(10.0))
  whole = jax.numpy.array([[-9.0, -8.0], [-11.0, -6.0]])  # prompt and completion
  sig = lambda x: 1 / (1 + np.exp(-x))
  d = np.array([(-3 + 3.5) - (-5 + 4), (-4 + 4) - (-2 + 3)])
  for kind, want in [
      ('dpo', np.mean(-0.9 * np.log(sig(0.5 * d)) - 0.1 * np.log(sig(-0.5 * d)))),
      ('ipo', np.mean(((np.array([0.5 / 2, 0.0]) - np.array([-1 / 4, 1.0])) - 1.0) ** 2)),
      ('simpo', np.mean(-0.9 * np.log(sig(0.5 * np.array([-1.5 + 1.25, -2.0]) - 0.5))
                        - 0.1 * np.log(sig(-(0.5 * np.array([-1.5 + 1.25, -2.0]) - 0.5))))),
  ]:
    o = objectives.Options(kind=kind, beta=0.5, label_smoothing=0.1 if kind != 'ipo' else 0.0)
    loss, metrics = objectives.pair_loss(o, logps, counts, ref, norm)
    assert float(loss) == pytest.approx(want, rel=1e-5), kind
  avg = np.array([[-1.5, -1.25], [-4.0, -2.0]])
  log_odds = (avg[:, 0] - avg[:, 1]) - (np.log1p(-np.exp(avg[:, 0])) - np.log1p(-np.exp(avg[:, 1])))
  want = 20.0 / 10.0 - 0.2 * np.mean(np.log(sig(log_odds)))
  loss, metrics = objectives.pair_loss(objectives.Options(kind='orpo', lambda_=0.2), logps, counts,
                                       None, norm, whole)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics['reward_accuracy']) == 0.0  # both pairs prefer the rejected answer


def test_pairs_share_a_row_and_truncation_keeps_the_prompt(tmp_path):
  from ftjax.data.formats import EncodeDoc, Encoder

  record = {'where': 'p.jsonl:1', 'raw': json.dumps({'prompt': 'abcd', 'chosen': 'xxxxxxxx',
                                                     'rejected': 'yy'})}
  doc, length = EncodeDoc(Encoder('byte'), 14, pairs=True).encode(record)
  assert length == 5 + 9 + 5 + 3 - 2
  assert doc['segment_ids'].tolist() == [1] * 7 + [2] * 7  # chosen cut from 13 to 7 positions
  assert doc['positions'].tolist() == list(range(7)) + list(range(7))
  assert doc['loss_mask'].tolist() == [0] * 4 + [1] * 3 + [0] * 4 + [1] * 3
  doc, _ = EncodeDoc(Encoder('byte'), 8, pairs=True).encode(record)
  assert doc == {'skip': 'prompt_too_long', 'where': 'p.jsonl:1'}
  with pytest.raises(data.DataError, match=r'p.jsonl:1: .*not_a_pair|p.jsonl:1: expected a '):
    EncodeDoc(Encoder('byte'), 14, pairs=True).encode(
        {'where': 'p.jsonl:1', 'raw': json.dumps({'prompt': 'a', 'completion': 'b'})})


# ------------------------------------------------------------------ the trainer, end to end

ARCH = dict(vocab_size=259, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, rope_theta=10_000.0)
OPTIM = dict(lr=1e-3, steps=10, warmup_steps=0, schedule_kind='constant', end_lr_ratio=1.0,
             weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, decay_embeddings=False)
DPO = objectives.Options(kind='dpo', beta=0.5)


def _pair_rows(tmp_path, seq_len=24):
  path = write_jsonl(tmp_path / 'pairs.jsonl', PAIRS)
  return data.eval_batches([data.Source(path)], data.Options(tokenizer='byte', seq_len=seq_len,
                                                             pairs=True), global_batch=8)[0]


def _setup(shape, devices, objective=DPO, lora_options=None, abstract=False):
  from ftjax.models import llama

  return trainer_lib.setup(arch=llama.Config(**ARCH), model_options={}, mesh_shape=shape,
                           rules_name='fsdp_tp', optim_kwargs=OPTIM, grad_accum=1, global_batch=8,
                           seed=0, devices=devices, objective=objective, lora_options=lora_options,
                           abstract=abstract)


def _two_steps(trainer, rows):
  batch = data.to_global(rows, trainer.batch_sharding)
  with sharding.use(trainer.mesh, trainer.rules):
    state, first = trainer.train_step(trainer.state, trainer.frozen, batch, trainer.ref)
    _, second = trainer.train_step(state, trainer.frozen, batch, trainer.ref)
  return jax.device_get(first), jax.device_get(second)


def test_sharded_dpo_step_equals_single_device(tmp_path):
  rows = _pair_rows(tmp_path)
  one = _two_steps(_setup((1, 1, 1), jax.devices()[:1]), rows)
  eight = _two_steps(_setup((2, 2, 2), jax.devices()), rows)
  assert one[0]['loss'] == pytest.approx(np.log(2.0), rel=1e-6)  # policy = reference at step 0
  assert one[1]['loss'] < one[0]['loss'] and one[1]['reward_margin'] > 0
  for got, want in zip(eight, one, strict=True):
    for key in ('loss', 'grad_norm', *objectives.PAIR_METRICS):
      assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), key


def test_lora_reference_is_the_base_and_the_step_holds_one_copy_of_it(tmp_path):
  from flax import nnx

  from ftjax import bench, lora

  rows = _pair_rows(tmp_path)
  options = lora.Options(rank=4, alpha=8.0)
  trainer = _setup((1, 1, 1), jax.devices()[:1], lora_options=options)
  # Adapters that change the model, so the policy is not the reference.
  trainer.state = trainer.state.replace(params=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), trainer.state.params))
  base = _setup((1, 1, 1), jax.devices()[:1])  # the same seed without adapters: the base
  batch = data.to_global(rows, trainer.batch_sharding)
  with sharding.use(trainer.mesh, trainer.rules):
    ref = jax.jit(lambda p, f, b: step_lib.reference_logps(p, f, b, graphdef=trainer.graphdef))(
        trainer.state.params, trainer.frozen, batch)
    policy = objectives.sequence_logps(
        nnx.merge(trainer.graphdef, trainer.state.params, trainer.frozen), batch)[0]
    explicit = objectives.sequence_logps(
        nnx.merge(base.graphdef, base.state.params, base.frozen), batch)[0]
  np.testing.assert_allclose(ref, explicit, rtol=1e-6)
  assert np.max(np.abs(np.asarray(policy) - np.asarray(explicit))) > 1e-3
  # The compiled LoRA DPO step takes the same arguments as the LoRA SFT step (one base, no
  # reference copy); full fine-tuning with a live reference adds one copy of the weights.
  sizes = {}
  for name, objective, lora_options in [
      ('lora_sft', objectives.SFT, options), ('lora_dpo', DPO, options),
      ('full_sft', objectives.SFT, None), ('full_dpo', DPO, None)]:
    t = _setup((1, 1, 1), jax.devices()[:1], objective, lora_options, abstract=True)
    compiled = t.train_step.lower(t.state, t.frozen, batch, t.ref).compile()
    sizes[name] = bench.memory(compiled)['arguments']
  weights = sharding.count_params(base.state.params) * 4
  assert sizes['lora_dpo'] == sizes['lora_sft']
  assert sizes['full_dpo'] - sizes['full_sft'] == pytest.approx(weights, rel=0.01)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_precomputed_reference_resume_and_accumulation_match_the_live_run(small_config, tmp_path):
  from ftjax import train

  pairs = write_jsonl(tmp_path / 'pairs.jsonl', PAIRS * 4)
  small_config.objective.update(kind='dpo', beta=0.5)
  small_config.data.update(path=pairs, eval_path=pairs, seq_len=24, global_batch=8)
  small_config.train.update(steps=6, log_every=1)
  small_config.ckpt.update(every_steps=0)
  keys = ('loss', 'grad_norm', *objectives.PAIR_METRICS)

  def run(name, **overrides):
    c = small_config.copy_and_resolve_references()
    for key, value in overrides.items():
      section, field = key.split('__')
      c[section][field] = value
    return train.run(c, str(tmp_path / name))

  run('live')
  live = _rows(tmp_path / 'live')
  assert live[-1]['reward_accuracy'] > 0.5 and live[-1]['loss'] < np.log(2.0)
  run('pre', objective__precompute_ref=True)
  pre = _rows(tmp_path / 'pre')
  with np.load(tmp_path / 'pre' / 'ref_logps.npz') as f:
    assert f['train'].shape == (6, 8, 2) and f['eval'].shape == (4, 8, 2)
  for a, b in zip(live, pre, strict=True):
    for key in keys:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
  # Stopped after step 3 and resumed: the same rows, bit for bit (the table is read back).
  stopped = run('resumed', objective__precompute_ref=True, train__stop_at_step=3)
  assert stopped['preempted_at'] == 3
  table = (tmp_path / 'resumed' / 'ref_logps.npz').read_bytes()
  run('resumed', objective__precompute_ref=True)
  assert (tmp_path / 'resumed' / 'ref_logps.npz').read_bytes() == table
  resumed = _rows(tmp_path / 'resumed')
  assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in pre]
  # Two microbatches give the update of one big batch.
  run('accum', optim__grad_accum=2, mesh__shape=(2, 2, 2))
  for a, b in zip(live, _rows(tmp_path / 'accum'), strict=True):
    for key in keys:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
