"""grpo: rewards, advantages, the loss against TRL's GRPOTrainer, rollouts and their replay."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import write_jsonl

from configs import base as base_config
from ftjax import config as config_lib
from ftjax import data, generation, objectives, rewards, rollout, sharding
from ftjax import step as step_lib
from ftjax import trainer as trainer_lib

PROMPTS = [{'prompt': f'{a}+{b}=', 'reference': str(a + b)} for a, b in
           [(1, 2), (3, 4), (2, 5), (6, 1)]]
# Four completions per prompt: right, wrong, with and without the stop token, different lengths.
COMPLETIONS = [['3', '4=', '3', '12+1'], ['7', '77 7', '8', '7'], ['7', '1', '75', '7+7'],
               ['7', '6', '7=7', '70']]


def test_builtin_rewards():
  assert rewards.number('the sum is 1,234.', '1234', {}) == 1.0
  assert rewards.number('12 then 13', '12', {}) == 0.0  # the last number counts
  assert rewards.number('none', '3', {}) == 0.0
  assert rewards.exact_match(' 42 ', '42', {}) == 1.0
  assert rewards.regex('{"a": 1}', '', {}, pattern=r'\{.*\}') == 1.0
  assert rewards.regex('x {"a": 1}', '', {}, pattern=r'\{.*\}') == 0.0
  assert rewards.reference_of({'answer': 5}) == '5'
  assert rewards.reference_of({'messages': [{'role': 'user', 'content': 'q'},
                                            {'role': 'assistant', 'content': 'a'}]}) == 'a'


def failing_reward(completion, reference, record):
  return 1.0 / len(completion)


def ascii_share(completion, reference, record):
  """A reward a random model's completions differ in (the share of ASCII characters)."""
  return sum(ch.isascii() for ch in completion) / max(len(completion), 1)


def test_a_failing_reward_names_the_record_and_the_function():
  scorer = rewards.Scorer.load([{'fn': f'{__name__}:failing_reward', 'weight': 1.0}], ['mine'])
  assert scorer.score('ab', {}, 'p.jsonl:1').tolist() == [0.5]
  with pytest.raises(rewards.RewardError, match=r"reward mine \(fn='test_grpo:failing_reward'\) "
                     r'failed on p.jsonl:7: ZeroDivisionError'):
    scorer.score('', {}, 'p.jsonl:7')
  nan = rewards.Scorer.load([{'fn': 'regex', 'pattern': 'x'}], ['r'])
  nan = rewards.Scorer(nan.names, nan.specs, (lambda *a, **k: float('nan'),))
  with pytest.raises(rewards.RewardError, match='returned nan on q:2: rewards must be finite'):
    nan.score('x', {}, 'q:2')


def test_grpo_config_is_checked(small_config):
  c = small_config
  c.objective.update(kind='grpo', group_size=1, max_new_tokens=4)
  with pytest.raises(config_lib.ConfigError, match=r'objective.group_size=1 must be >= 2'):
    config_lib.resolve(c)
  c.objective.update(group_size=4, rewards=[{'fn': 'nope'}])
  with pytest.raises(config_lib.ConfigError, match=r"objective.rewards\[0\]: fn='nope'"):
    config_lib.resolve(c)
  c.objective.update(rewards=[{'fn': 'number'}], max_new_tokens=16)
  with pytest.raises(config_lib.ConfigError, match='must be below data.seq_len=16'):
    config_lib.resolve(c)
  c.objective.update(max_new_tokens=4, num_iterations=2)
  c.train.stop_at_step = 3
  with pytest.raises(config_lib.ConfigError, match='stop_at_step=3 must be a multiple'):
    config_lib.resolve(c)
  c.train.stop_at_step = 0
  r = config_lib.resolve(c)
  assert r.data.global_batch == 8 * 4 and not r.data.pack  # prompts x group size
  back = config_lib.from_run_json(json.loads(json.dumps(config_lib.run_json(r))))
  assert back.objective == r.objective


def test_advantages_match_their_definition():
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 3, size=(12, 2)).astype(np.float32)
  for scale in objectives.SCALE_REWARDS:
    o = objectives.Options(kind='grpo', group_size=4, prompts_per_step=3, scale_rewards=scale,
                           rewards=[{'fn': 'number', 'weight': 1.0},
                                    {'fn': 'regex', 'weight': 0.5, 'pattern': 'x'}])
    adv, metrics = objectives.advantages(o, jnp.asarray(raw))
    total = raw @ np.array([1.0, 0.5], np.float32)
    groups = total.reshape(3, 4)
    want = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    std = {'group': np.repeat(groups.std(1, ddof=1), 4), 'batch': total.std(ddof=1),
           'none': 1.0 - 1e-4}[scale]
    np.testing.assert_allclose(adv, want / (std + 1e-4), rtol=1e-5, atol=1e-6)
    assert float(metrics['reward']) == pytest.approx(total.mean())
    assert float(metrics['reward_regex']) == pytest.approx(raw[:, 1].mean())


def test_layout_puts_the_loss_on_the_completion():
  rows = rollout.layout([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], seq_len=6)
  assert rows['tokens'][0].tolist() == [1, 5, 6, 8, 9, 0]
  assert rows['targets'][0].tolist() == [5, 6, 8, 9, 2, 0]
  assert rows['loss_mask'][0].tolist() == [0, 0, 1, 1, 1, 0]
  assert rows['loss_mask'][1].tolist() == [0, 1, 0, 0, 0, 0]
  assert rows['segment_ids'][1].tolist() == [1, 1, 0, 0, 0, 0]
  with pytest.raises(ValueError, match='do not fit data.seq_len=3'):
    rollout.layout([[1, 5, 6]], [[8, 9]], seq_len=3)


def _noise(shape):
  """The perturbation of the rollout-time log-probabilities both sides get (so ratios clip)."""
  return np.random.default_rng(3).uniform(-0.4, 0.4, size=shape).astype(np.float32)


def _ours(folder, adapter, prompts_path, **objective):
  from ftjax.data import formats

  c = base_config.get_config()
  c.model.pretrained = folder
  c.lora.adapter = adapter
  c.objective.update(kind='grpo', group_size=4, prompts_per_step=len(PROMPTS), **objective)
  c.data.update(path=prompts_path, seq_len=16)
  r = config_lib.resolve(c)
  trainer = trainer_lib.from_resolved(r)
  prompts = rollout.Prompts.load(list(r.data.sources), r.data.options, max_length=12)
  tok = formats.cached_tokenizer(r.data.options.tokenizer)
  completions = [tok.encode(text) + ([tok.eos_id] if len(text) < 2 else [])
                 for row in COMPLETIONS for text in row]
  prompt_ids = [ids for ids in prompts.ids for _ in range(4)]
  rows = rollout.layout(prompt_ids, completions, 16)
  scorer = rewards.Scorer.load(r.objective.reward_specs, objectives.reward_names(r.objective))
  scores = np.stack([scorer.score(tok.decode([t for t in c if t != tok.eos_id]),
                                  prompts.records[i // 4], 'x') for i, c in enumerate(completions)])
  sh = trainer.batch_sharding
  batch = {k: data.global_rows(v, sh) for k, v in rows.items()}
  batch['rewards'] = data.global_rows(scores, sh)
  with sharding.use(trainer.mesh, trainer.rules):
    batch.update(trainer.rollout_logps(trainer.state.params, trainer.frozen, batch, trainer.ref))
    start = len(prompt_ids[0]) - 1
    width = max(len(c) for c in completions)
    old = np.asarray(batch['old_logps']).copy()
    old[:, start:start + width] += _noise((len(completions), width))
    batch['old_logps'] = data.global_rows(old, sh)

    def grads_fn(params, frozen, batch):
      norm = objectives.normalizers(r.objective, batch)
      adv, _ = objectives.advantages(r.objective, batch['rewards'])
      return step_lib.loss_grads(params, frozen, dict(batch, advantages=adv), norm,
                                 graphdef=trainer.graphdef, objective=r.objective)

    grads, loss, metrics = jax.jit(grads_fn)(trainer.state.params, trainer.frozen, batch)
  return trainer, prompt_ids, completions, grads, float(loss), jax.device_get(metrics)


def _trl(folder, adapter, prompt_ids, completions, tmp_path, **args):
  import datasets
  import peft
  import transformers
  import trl

  os.environ['TRL_EXPERIMENTAL_SILENCE'] = '1'
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)

  def rollout_func(prompts, trainer):
    return dict(prompt_ids=prompt_ids, completion_ids=completions,
                logprobs=[[0.0] * len(c) for c in completions])

  def number(prompts, completions, reference, **kwargs):
    return [rewards.number(c, ref, {}) for c, ref in zip(completions, reference, strict=True)]

  config = trl.GRPOConfig(output_dir=str(tmp_path / 'trl'), per_device_train_batch_size=16,
                          num_generations=4, max_completion_length=4, report_to='none',
                          use_cpu=True, bf16=False, num_iterations=2, **args)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=[number], args=config,
                            train_dataset=datasets.Dataset.from_list(PROMPTS),
                            processing_class=tokenizer, rollout_func=rollout_func)
  # TRL's reference for a loaded adapter is a copy of it ("ref"); ours is the adapter-free base
  # (as TRL's for a fresh adapter): drop the copy so that TRL disables the adapter instead.
  if 'ref' in trainer.model.peft_config:
    trainer.model.delete_adapter('ref')
  trainer.model.train()
  trainer.current_gradient_accumulation_steps = 1  # what the HF training loop sets per step
  inputs = [p for p in PROMPTS for _ in range(4)]
  out = trainer._generate_and_score_completions(inputs)
  out['old_per_token_logps'] = out['old_per_token_logps'] + torch.from_numpy(
      _noise(tuple(out['old_per_token_logps'].shape)))
  loss = trainer._compute_loss(trainer.model, out)
  loss.backward()
  grads = {n.replace('.default', ''): p.grad.float().numpy() for n, p in
           trainer.model.named_parameters() if p.grad is not None}
  metrics = {k: v[-1] for k, v in trainer._metrics['train'].items()}
  return float(loss.detach()), grads, metrics


# Our objective options for each TRL loss type (TRL: loss_type, scale_rewards).
TRL_CASES = [
    ('grpo', 'group', dict(loss_norm='sequence')),
    ('bnpo', 'batch', dict(loss_norm='token', scale_rewards='batch')),
    ('dapo', 'group', dict(loss_norm='token', epsilon_high=0.28)),
    ('dr_grpo', 'none', dict(loss_norm='fixed', scale_rewards='none')),
]


@pytest.mark.slow
@pytest.mark.parametrize('trl_loss,trl_scale,ours', TRL_CASES, ids=[c[0] for c in TRL_CASES])
def test_loss_and_gradients_equal_trl(bos_folder, policy_adapter, tmp_path, trl_loss, trl_scale,
                                      ours):
  from test_preference import _peft_named

  prompts_path = write_jsonl(tmp_path / 'prompts.jsonl', PROMPTS)
  common = dict(epsilon=0.2, temperature=0.7)
  trainer, prompt_ids, completions, grads, loss, metrics = _ours(
      bos_folder, policy_adapter, prompts_path, kl_beta=0.05, max_new_tokens=4,
      rewards=[{'fn': 'number', 'weight': 1.0}], num_iterations=2, **common, **ours)
  want_loss, want_grads, want = _trl(
      bos_folder, policy_adapter, prompt_ids, completions, tmp_path, loss_type=trl_loss,
      scale_rewards=trl_scale, beta=0.05, epsilon_high=ours.get('epsilon_high', 0.2), **common)
  assert len({len(c) for c in completions}) >= 3  # sequence and token means differ
  assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  assert 0.0 < float(metrics['clip_fraction']) < 0.5  # the perturbed ratios do clip
  assert float(metrics['kl']) == pytest.approx(want['kl'], rel=1e-4, abs=1e-6)
  assert float(metrics['entropy']) == pytest.approx(want['entropy'], rel=1e-4)
  assert float(metrics['clip_low']) == pytest.approx(want['clip_ratio/low_mean'], abs=1e-6)
  assert float(metrics['clip_high']) == pytest.approx(want['clip_ratio/high_mean'], abs=1e-6)
  named = _peft_named(trainer, grads, str(tmp_path / 'grads'))
  assert sorted(named) == sorted(want_grads)
  scale = max(np.max(np.abs(g)) for g in want_grads.values())
  assert scale > 1e-4
  for name, g in want_grads.items():
    np.testing.assert_allclose(named[name], g, atol=2e-5 * scale, err_msg=name)


def _grpo_config(small_config, **objective):
  c = small_config
  objective = {'rewards': [{'fn': 'number', 'weight': 1.0}], **objective}
  c.objective.update(kind='grpo', group_size=4, prompts_per_step=4, max_new_tokens=4,
                     **objective)
  c.train.update(steps=6, log_every=1)
  c.ckpt.update(every_steps=0)
  return c


def _rollouts(small_config, **objective):
  r = config_lib.resolve(_grpo_config(small_config, **objective))
  trainer = trainer_lib.from_resolved(r)
  prompts = rollout.Prompts.load(list(r.data.sources), r.data.options, max_length=13)
  tok = data.formats.cached_tokenizer(r.data.options.tokenizer)
  return trainer, rollout.Rollouts(trainer, prompts, r.objective, seq_len=16, seed=0,
                                   tokenizer=tok)


def test_rollouts_replay_for_a_seed_and_step_and_compile_once_per_bucket(small_config):
  trainer, rolls = _rollouts(small_config, temperature=1.0)
  with sharding.use(trainer.mesh, trainer.rules):
    before = len(generation.DECODE_TRACES)
    first = rolls.generate(0)
    again = [rolls.generate(k) for k in (0, 1, 2, 3)]
    traces = len(generation.DECODE_TRACES) - before
  assert again[0] == first  # the same (seed, step): the same completions
  assert again[1] != first
  assert rolls.prompt_indices(1) != rolls.prompt_indices(0)
  lengths = {generation.bucket(max(len(rolls.prompts.ids[i]) for i in rolls.prompt_indices(k)))
             for k in range(4)}
  assert traces == len(lengths) == 1  # every addition prompt falls in one bucket
  assert len(first) == 16 and all(1 <= len(c) <= 4 for c in first)


def test_grpo_training_reuses_rollouts_and_resumes_bitwise(small_config, tmp_path):
  from ftjax import train

  keys = ('loss', 'grad_norm', 'reward', 'entropy', 'clip_fraction', 'kl')

  def run(name, **overrides):
    c = _grpo_config(small_config.copy_and_resolve_references(), num_iterations=2, kl_beta=0.1,
                     rewards=[{'fn': f'{__name__}:ascii_share', 'weight': 1.0}])
    for key, value in overrides.items():
      section, field = key.split('__')
      c[section][field] = value
    out = train.run(c, str(tmp_path / name))
    with open(tmp_path / name / 'metrics.jsonl') as f:
      return out, [r for r in map(json.loads, f) if 'loss' in r]

  summary, straight = run('straight')
  assert summary['train_step_compiles'] == 1
  assert [r['step'] for r in straight] == [1, 2, 3, 4, 5, 6]
  assert all('rollout_tokens_per_s' in r and 'train_tokens_per_s' in r for r in straight)
  samples = straight[0]['rollout_samples']
  assert samples and 'reward_ascii_share' in samples[0]
  # Iteration 2 of a rollout trains on the same rows against stored old log-probabilities.
  assert straight[0]['reward'] == straight[1]['reward']
  assert straight[1]['kl'] > 0
  stopped, _ = run('resumed', train__stop_at_step=4)
  assert stopped['preempted_at'] == 4
  _, resumed = run('resumed')
  assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in straight]
