"""What several test modules share: paths, data files, tiny Hugging Face checkpoints and tokenizers,
and the one way tests run the `ftjax` command line in a subprocess.

Test modules import from here (or use the fixtures of conftest.py), never from each other.
"""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return str(path)


# ------------------------------------------------------------------------ the command line

def cli_env(devices=1, env=None):
  """The environment of a subprocess: this checkout's code first on the path, `devices` fake
  CPU devices (None: XLA_FLAGS as they are), and the session's compilation cache, which
  conftest.py puts in os.environ (JAX_COMPILATION_CACHE_DIR and its thresholds)."""
  out = dict(os.environ if env is None else env)
  out['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in out.get('PYTHONPATH', '').split(
      os.pathsep) if p and p != REPO])
  if devices is not None:
    out['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return out


def ftjax_command(*args):
  """`python -m ftjax.main ARGS` with this interpreter."""
  return [sys.executable, '-m', 'ftjax.main', *map(str, args)]


def run_command(command, *, devices=1, env=None, cwd=REPO, timeout=600):
  """Runs `command` (a list) to the end with cli_env, capturing text stdout and stderr."""
  return subprocess.run(list(map(str, command)), capture_output=True, text=True,
                        env=cli_env(devices, env), cwd=cwd, timeout=timeout)


def run_ftjax(*args, devices=1, env=None, cwd=REPO, timeout=600):
  """`ftjax ARGS` in a subprocess, run to the end: the CompletedProcess (returncode, stdout,
  stderr as text). `devices` fake CPU devices; `env` replaces os.environ as the base."""
  return run_command(ftjax_command(*args), devices=devices, env=env, cwd=cwd, timeout=timeout)


def start_ftjax(*args, devices=1, env=None, cwd=REPO, **popen_kwargs):
  """`ftjax ARGS` started in the background (a Popen), for tests that signal or kill it."""
  return subprocess.Popen(ftjax_command(*args), env=cli_env(devices, env), cwd=cwd,
                          **popen_kwargs)


def train_command(workdir, *flags, config=f'{REPO}/configs/demo.py'):
  """The arguments of `ftjax train` on `config` (the demo) into `workdir`, without progress bars."""
  return ['train', '--config', config, f'--workdir={workdir}', '--config.train.progress=False',
          *flags]


# --------------------------------------------------------------- Hugging Face checkpoints

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6)
GEMMA3_ROPE = {'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
               'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}}
# Soft-caps, windows and rope settings are set small enough to change the logits here.
CASES = {
    'llama': ('llama', dict(tie_word_embeddings=False)),
    'llama_bias': ('llama', dict(attention_bias=True)),  # biases on q, k, v and o
    'llama3_mha_tied': ('llama', dict(num_key_value_heads=4, tie_word_embeddings=True,
                                      rope_parameters={'rope_type': 'llama3', 'factor': 32.0,
                                                       'low_freq_factor': 1.0,
                                                       'high_freq_factor': 4.0, 'rope_theta': 5e5,
                                                       'original_max_position_embeddings': 16})),
    'mistral': ('mistral', dict(sliding_window=8)),
    'qwen2': ('qwen2', dict()),
    'qwen3': ('qwen3', dict()),
    'gemma': ('gemma', dict(num_key_value_heads=1)),
    'gemma2': ('gemma2', dict(sliding_window=8, attn_logit_softcapping=0.1,
                              final_logit_softcapping=5.0, query_pre_attn_scalar=24)),
    'gemma3': ('gemma3_text', dict(sliding_window=8, query_pre_attn_scalar=24,
                                   layer_types=['sliding_attention', 'full_attention'],
                                   rope_parameters=GEMMA3_ROPE)),
    # Mixtures of experts: 4 experts, top-2, perturbed routers (see make_hf).
    'qwen3_moe': ('qwen3_moe', dict(num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=48, norm_topk_prob=False,
                                    decoder_sparse_step=1, mlp_only_layers=[])),
    'qwen3_moe_norm': ('qwen3_moe', dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=True)),
    'mixtral': ('mixtral', dict(num_local_experts=4, num_experts_per_tok=2)),
    'qwen2_moe': ('qwen2_moe', dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=80, norm_topk_prob=False,
                                    decoder_sparse_step=1, mlp_only_layers=[])),
}
ROUTERS = ('mlp.gate.weight', 'block_sparse_moe.gate.weight', 'mlp.shared_expert_gate.weight')


def make_hf(case: str, folder: str, max_shard_size: str = '5GB', **overrides):
  """A tiny random HF model with every norm and bias perturbed, saved as safetensors."""
  import torch
  import transformers

  model_type, extra = CASES[case]
  config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
  config._attn_implementation = 'eager'
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or 'bias' in name:
        p.add_(0.2 * torch.randn_like(p))
      if name.endswith(ROUTERS):  # routers start near zero: spread them so routing is decisive
        p.copy_(0.5 * torch.randn_like(p))
  model.save_pretrained(folder, max_shard_size=max_shard_size)
  return model


def hf_logits(model, tokens):
  import torch

  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


SPECIALS = ['<pad>', '<s>', '</s>']


def add_bpe_tokenizer(folder, texts):
  """A small BPE tokenizer trained on `texts`, saved the way Hugging Face folders hold one."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  backend = Tokenizer(models.BPE(unk_token=None))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=200, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<s>',
                                              eos_token='</s>', pad_token='<pad>')
  fast.save_pretrained(folder)


def digest(folder):
  """Relative path -> SHA-256 of every file under `folder`."""
  import hashlib

  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def add_bos_post_processor(folder):
  """Makes the folder's tokenizer add BOS as Llama's does (TRL tokenizes with the tokenizer's
  special tokens; ftjax prepends BOS itself), so both see the same ids."""
  from tokenizers import Tokenizer, processors

  tok = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  tok.save(os.path.join(folder, 'tokenizer.json'))


def make_policy_adapter(base_folder, out):
  """A PEFT adapter with random A and B (scaled up), so the policy differs from the base."""
  import peft
  import torch
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'],
                           init_lora_weights=False, task_type='CAUSAL_LM')
  torch.manual_seed(1)
  model = peft.get_peft_model(base, config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.mul_(20.0)  # a policy well away from the reference
  model.save_pretrained(out)
  return out
