"""The `ftjax` command: `ftjax train --config configs/X.py [--config.a.b=v ...] --workdir DIR`."""

from __future__ import annotations

import functools
import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py); override keys with --config.<section>.<key>=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: metrics, TensorBoard, config.json.')
_OUT = flags.DEFINE_string('out', None, 'export: the Hugging Face folder to write; generate: a '
                           'JSONL file of the completions (- = stdout); plot: the PNG.')
_SOURCE = flags.DEFINE_string('source', None, 'data prepare: the source to convert.')
_SPLIT = flags.DEFINE_string('split', '', 'data prepare: split of a tfds:// source.')
_BATCHES = flags.DEFINE_integer('batches', 50, 'data bench: batches to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'bench: train steps to time (after 2 warm-up steps).')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'plan: a TPU accelerator type as gcloud spells '
                                'it (v4-32, v5litepod-8 or v5e-8, v5p-64, v6e-8).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for clusters JAX does not detect '
    '(default: $FTJAX_COORDINATOR; TPU VMs, SLURM and JobSets are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1.')
_JOIN_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', None, 'seconds to wait for every process to join (default 300).')
_FORMAT = flags.DEFINE_enum('format', 'hf', ['hf', 'peft'],
                            'export: hf (full model; LoRA merged) or peft (adapter folder).')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'export: replace a non-empty --out folder '
                                  '(never the run, its base model, adapter or tokenizer).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                           'export: dtype of the written weights (default bfloat16); generate: '
                           'compute dtype (default float32 on CPU, else bfloat16).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'generate: a Hugging Face model folder.')
_ADAPTER = flags.DEFINE_string('adapter', None, 'generate: a PEFT adapter on --pretrained.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'generate: a prompt (repeat for a batch).')
_PROMPTS = flags.DEFINE_string('prompts', None, 'generate: a JSONL file of prompts: '
                               '{"prompt": ...} or {"messages": [...]} per line.')
_MAX_NEW = flags.DEFINE_integer('max-new-tokens', 64, 'generate: tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'generate: 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top-k', 0, 'generate: sample among the k likeliest (0 = all).')
_TOP_P = flags.DEFINE_float('top-p', 1.0, 'generate: nucleus sampling mass (1 = all).')
_SEED = flags.DEFINE_integer('seed', 0, 'generate: sampling seed.')
_CHAT = flags.DEFINE_boolean('chat', False, 'generate: wrap each prompt in the chat template.')
_STOP = flags.DEFINE_multi_string('stop', [], 'generate: a token (its text) that ends a '
                                  'completion, besides EOS (repeatable).')
_BATCH_SIZE = flags.DEFINE_integer('batch-size', 8, 'generate: prompts per batch.')

USAGE = """usage: ftjax COMMAND [flags]

commands:
  train   fine-tune a model: ftjax train --config configs/demo.py --workdir /tmp/demo
  export  write a run as a Hugging Face folder: ftjax export --workdir RUN --out HF_DIR
  generate  sample from a run or a Hugging Face folder (KV cache, sharded):
          ftjax generate --workdir RUN | --pretrained HF_DIR [--adapter PEFT_DIR]
            [--prompt TEXT ... | --prompts FILE.jsonl] [--chat] [--max-new-tokens N]
            [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop TOKEN] [--out F.jsonl]
  plot    loss and learning rate against steps as a PNG: ftjax plot --workdir RUN [--out F.png]
  data    data prepare --source FILE --out FILE.array_record   (random access at scale)
          data bench --config X [--batches N]    (tokens/s of the input pipeline alone)
  checkpoint bench --config X     (blocking vs total time of an async checkpoint save)
  bench   time the real train step: ftjax bench --config X [--steps N]  (tokens/s, MFU, memory)
  plan    compile the train step for a TPU slice from this machine and say if it fits:
          ftjax plan --config X --topology v5p-64
  launch  --local N --devices-per-process M -- ftjax train ...   (N processes on this machine)
"""


def _fail(message: str) -> None:
  print(f'ftjax: error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv[:-1]:
    path = argv[argv.index('--config') + 1]
  return path


def _check_config_file(argv: list[str]) -> None:
  """A missing or unparsable `--config` file, named in one line before absl loads it."""
  path = _config_path(argv)
  if not path:
    return
  file = path.partition(':')[0]
  if not os.path.isfile(file):
    _fail(f'--config={path!r}: file not found')
  try:
    with open(file, encoding='utf-8') as f:
      compile(f.read(), file, 'exec')
  except SyntaxError as e:
    _fail(f'{file}:{e.lineno}: {e.msg} (a syntax error in the config file)')
  except (OSError, UnicodeDecodeError) as e:
    _fail(f'--config={path!r}: cannot read it ({e})')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with config errors reported in one line naming the key."""
  _check_config_file(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these from deep inside flag parsing for a bad override.
    _fail(_explain_override_error(argv) or f'invalid config override: {e!r}')
  except Exception as e:  # noqa: BLE001 (the config file's own code failed: NameError, ...)
    cause = e.__cause__ or e
    _fail(f'--config={_config_path(argv)!r} failed to load: {type(cause).__name__}: '
          f'{str(cause).splitlines()[0] if str(cause) else ""}')
  return []


def _explain_override_error(argv: list[str]) -> str | None:
  """Names the first `--config.<key>` override whose key the config file does not define."""
  path = _config_path(argv)
  if path is None:
    return None
  file, _, arg = path.partition(':')
  get_config = runpy.run_path(file)['get_config']
  config = get_config(arg) if arg else get_config()
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node = config
    for i, part in enumerate(key.split('.')):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(key.split('.')[:i]) or 'the config'
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        return f'unknown config key {key!r} in {a!r}; {where} has keys {known}'
      node = node[part]
  return None


def _join() -> None:
  from ftjax import distributed

  timeout = _JOIN_TIMEOUT.value or int(os.environ.get('FTJAX_DISTRIBUTED_TIMEOUT', 300))
  try:
    distributed.initialize(coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                           process_id=_PROCESS_ID.value, timeout_s=timeout)
  except distributed.DistributedError as e:
    _fail(str(e))


def _train(argv: list[str]) -> None:
  _join()
  from ftjax import train  # import jax only once flags are parsed

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config configs/demo.py')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for metrics, TensorBoard and config.json')
  try:
    summary = train.run(_CONFIG.value, _WORKDIR.value)
  except train.NonFiniteError as e:
    print(f'ftjax: error: {e}', file=sys.stderr)
    sys.exit(1)
  if summary['preempted_at'] is not None:
    sys.exit(train.EXIT_RESTART)


def _export(argv: list[str]) -> None:
  _join()
  from ftjax import export

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    _fail('usage: ftjax export --workdir RUN --out DIR [--format hf|peft] '
          '[--dtype bfloat16|float32] [--overwrite]')
  if not os.path.isfile(os.path.join(_WORKDIR.value, 'config.json')):
    _fail(f'--workdir={_WORKDIR.value!r} holds no config.json: not an ftjax run directory')
  try:
    out = export.export(_WORKDIR.value, _OUT.value, fmt=_FORMAT.value,
                        dtype=_DTYPE.value or 'bfloat16', overwrite=_OVERWRITE.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  print(f'exported {_WORKDIR.value} -> {out}')


def _data(argv: list[str]) -> None:
  import json

  from ftjax import data, train
  from ftjax.data import bench as data_bench

  action = argv[1] if len(argv) == 2 else None
  if action == 'prepare':
    if not _SOURCE.value or not _OUT.value:
      _fail('usage: ftjax data prepare --source FILE --out FILE.array_record [--split S]')
    try:
      count = data.prepare(_SOURCE.value, _OUT.value, split=_SPLIT.value)
    except data.DataError as e:
      _fail(str(e))
    print(f'wrote {count} records to {_OUT.value}')
  elif action == 'bench':
    if _CONFIG.value is None:
      _fail('usage: ftjax data bench --config configs/X.py [--batches N]')
    config = _CONFIG.value
    try:
      train.validate(config)
      result = data_bench.bench(train.train_sources(config.data), train.data_options(config),
                           global_batch=config.data.global_batch, seed=config.train.seed,
                           pack=config.data.pack, workers=config.data.workers,
                           batches=_BATCHES.value)
    except (train.ConfigError, data.DataError) as e:
      _fail(str(e))
    print(json.dumps(result))
  else:
    _fail('usage: ftjax data prepare|bench ...')


def _checkpoint(argv: list[str]) -> None:
  import json
  import tempfile

  from ftjax import checkpoint, train

  if argv[1:] != ['bench'] or _CONFIG.value is None:
    _fail('usage: ftjax checkpoint bench --config configs/X.py [--config.model.<field>=...]')
  config = _CONFIG.value
  try:
    arch = train.model_config(config.model)
    trainer = train.setup(
        arch=arch, model_options=dict(param_dtype=train.DTYPES[config.model.param_dtype]),
        mesh_shape=tuple(config.mesh.shape), rules_name=config.mesh.rules,
        optim_kwargs=train.optim_kwargs(config.optim, config.train.steps), grad_accum=1,
        global_batch=config.data.global_batch, seed=0, pretrained_path=config.model.pretrained)
  except train.ConfigError as e:
    _fail(str(e))
  with tempfile.TemporaryDirectory(dir=_WORKDIR.value) as root:
    print(json.dumps(checkpoint.bench(trainer.state, root)))


def _read_prompts() -> list[dict]:
  import json

  records = [{'prompt': p} for p in _PROMPT.value]
  if _PROMPTS.value:
    try:
      with open(_PROMPTS.value, encoding='utf-8') as f:
        records += [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
      _fail(f'--prompts={_PROMPTS.value!r}: {e}')
  if not records:
    _fail('no prompts: pass --prompt TEXT (repeatable) or --prompts FILE.jsonl')
  return records


def _generate(argv: list[str]) -> None:
  _join()
  import json
  import time

  import jax

  from ftjax import build, data, generation, sharding, weights
  from ftjax.models import llama

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if bool(_WORKDIR.value) == bool(_PRETRAINED.value):
    _fail('usage: ftjax generate --workdir RUN | --pretrained HF_DIR [--prompt TEXT | '
          '--prompts FILE.jsonl] [--max-new-tokens N] [--temperature T]')
  if _ADAPTER.value and not _PRETRAINED.value:
    _fail('--adapter needs --pretrained (the base the adapter was trained on)')
  try:
    generation.check_sampling(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value, top_p=_TOP_P.value,
                              batch_size=_BATCH_SIZE.value, flag_names=True)
  except generation.GenerationError as e:
    _fail(str(e))
  records = _read_prompts()
  dtype = _DTYPE.value or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  # Architecture, tokenizer and prompts first (cheap), so the KV cache is checked before any
  # weight is read. The rules are the ones `build.for_generation` lays the model out by.
  try:
    if _WORKDIR.value:
      run = build.read_run(_WORKDIR.value)
      arch, tok_spec = llama.Config(**run['resolved_model']), build.run_tokenizer(run)
      rules_name, source = run['mesh']['rules'], f'--workdir={_WORKDIR.value}'
    else:
      arch, tok_spec = build.pretrained.read_config(_PRETRAINED.value), _PRETRAINED.value
      rules_name, source = 'fsdp_tp', f'--pretrained={_PRETRAINED.value}'
      source += f' with --adapter={_ADAPTER.value}' if _ADAPTER.value else ''
    tok = data.formats.cached_tokenizer(tok_spec)
  except (FileNotFoundError, ValueError, weights.CheckpointError) as e:
    _fail(str(e))
  encoder = data.formats.Encoder(tok_spec)
  try:
    prompts, _ = zip(*(encoder.prompt(r, chat=_CHAT.value) for r in records), strict=True)
  except (data.formats.BadRecord, ValueError) as e:
    _fail(f'prompt: {e}')
  stop_ids = [tok.eos_id]
  for text in _STOP.value:
    ids = tok.encode(text)
    if len(ids) != 1:
      _fail(f'--stop={text!r} is {len(ids)} tokens; a stop must be a single token')
    stop_ids += ids
  mesh = sharding.make_mesh((1, -1, 1))
  base = _PRETRAINED.value or run['model']['pretrained']
  try:
    generation.check_cache_fits(
        arch, batch=min(_BATCH_SIZE.value, len(prompts)),
        prompt_length=max(len(p) for p in prompts), max_new_tokens=_MAX_NEW.value,
        dtype=build.pretrained.DTYPES[dtype], flag_names=True,
        batch_shards=sharding.batch_shards(mesh, sharding.get_rules(rules_name)))
    generation.check_context(build.pretrained.max_context(base) if base else None,
                             prompt_length=max(len(p) for p in prompts),
                             max_new_tokens=_MAX_NEW.value, source=base or source)
    model, _, mesh, rules = build.for_generation(
        pretrained_path=_PRETRAINED.value or '', adapter=_ADAPTER.value or '',
        workdir=_WORKDIR.value or '', dtype=build.pretrained.DTYPES[dtype], mesh=mesh)
    generation.check_finite(model, source)
  except (FileNotFoundError, ValueError, weights.CheckpointError) as e:
    _fail(str(e))
  start = time.perf_counter()
  results = generation.complete(
      model, [list(p) for p in prompts], batch_size=_BATCH_SIZE.value, stop_ids=stop_ids,
      decode=tok.decode, mesh=mesh, rules=rules, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None,
      top_p=_TOP_P.value if _TOP_P.value < 1.0 else None, seed=_SEED.value)
  if jax.process_index() != 0:
    return
  new_tokens = sum(len(r['tokens']) for r in results)
  print(f'generated {new_tokens} tokens for {len(results)} prompts in '
        f'{time.perf_counter() - start:.1f}s (compilation included)', file=sys.stderr)
  rows = [{**r, 'prompt_tokens': len(p), **result}
          for r, p, result in zip(records, prompts, results, strict=True)]
  if _OUT.value and _OUT.value != '-':
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
  for i, row in enumerate(rows):
    if _OUT.value == '-':
      print(json.dumps(row))
    else:
      shown = row['prompt'] if 'prompt' in row else tok.decode(prompts[i])
      print(f'--- {i}\n{shown}{row["completion"]}')


def _plot(argv: list[str]) -> None:
  from ftjax import plot

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    _fail('usage: ftjax plot --workdir RUN [--out FILE.png]')
  try:
    out = plot.plot(_WORKDIR.value, _OUT.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  print(f'wrote {out}')


def _bench(argv: list[str]) -> None:
  import json

  from ftjax import bench, train

  if len(argv) > 1 or _CONFIG.value is None:
    _fail('usage: ftjax bench --config configs/X.py [--steps N] [--config.KEY=VALUE ...]')
  try:
    result = bench.run(_CONFIG.value, steps=_STEPS.value)
  except train.ConfigError as e:
    _fail(str(e))
  print(json.dumps(result))


def _plan(argv: list[str]) -> None:
  import json

  from ftjax import plan, train

  if len(argv) > 1 or _CONFIG.value is None or not _TOPOLOGY.value:
    _fail('usage: ftjax plan --config configs/X.py --topology v5p-64 [--config.KEY=VALUE ...]')
  try:
    result = plan.run(_CONFIG.value, _TOPOLOGY.value)
  except (train.ConfigError, plan.PlanError) as e:
    _fail(str(e))
  print(json.dumps(result))


COMMANDS = {'train': _train, 'export': _export, 'generate': _generate, 'plot': _plot,
            'data': _data, 'checkpoint': _checkpoint, 'bench': _bench, 'plan': _plan}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in (*COMMANDS, 'launch'):
    print(USAGE, file=sys.stderr)
    sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ('-h', '--help') else 2)
  command = sys.argv.pop(1)
  if command == 'launch':  # its own argument parser: everything after -- is the command
    from ftjax import launch

    sys.exit(launch.main(sys.argv[1:]))
  logging.set_verbosity(logging.WARNING)
  app.run(functools.partial(_guarded, COMMANDS[command]),
          argv=[f'ftjax {command}', *sys.argv[1:]], flags_parser=_parse_flags)


def _describe(e: BaseException) -> str:
  """One line for an error in what the user gave us (a file, a folder, a value)."""
  if isinstance(e, UnicodeDecodeError):
    return f'not valid UTF-8 ({e.reason} at byte {e.start})'
  if isinstance(e, OSError) and e.filename:
    return f'{e.filename}: {e.strerror or e}'
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _guarded(command, argv: list[str]) -> None:
  """Runs a command; user errors (by type: ours, files, bytes) end as one line and exit 2."""
  from ftjax.errors import UserError

  try:
    command(argv)
  except (UserError, OSError, UnicodeDecodeError) as e:
    _fail(_describe(e))


if __name__ == '__main__':
  main()
