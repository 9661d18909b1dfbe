"""The `ftjax` command: `ftjax train --config configs/X.py [--config.a.b=v ...] --workdir DIR`."""

from __future__ import annotations

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
_OUT = flags.DEFINE_string('out', None, 'export: the Hugging Face folder to write.')
_SOURCE = flags.DEFINE_string('source', None, 'data prepare: the source to convert.')
_SPLIT = flags.DEFINE_string('split', '', 'data prepare: split of a tfds:// source.')
_BATCHES = flags.DEFINE_integer('batches', 50, 'data bench: batches to time.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for clusters JAX does not detect '
    '(default: $FTJAX_COORDINATOR; TPU VMs, SLURM and JobSets are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1.')
_JOIN_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', None, 'seconds to wait for every process to join (default 300).')
_FORMAT = flags.DEFINE_enum('format', 'hf', ['hf', 'peft'],
                            'export: hf (full model; LoRA merged) or peft (adapter folder).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'export: dtype of the written weights.')

USAGE = """usage: ftjax COMMAND [flags]

commands:
  train   fine-tune a model: ftjax train --config configs/demo.py --workdir /tmp/demo
  export  write a run as a Hugging Face folder: ftjax export --workdir RUN --out HF_DIR
  data    data prepare --source FILE --out FILE.array_record   (random access at scale)
          data bench --config X [--batches N]    (tokens/s of the input pipeline alone)
  checkpoint bench --config X     (blocking vs total time of an async checkpoint save)
  launch  --local N --devices-per-process M -- ftjax train ...   (N processes on this machine)
"""


def _fail(message: str) -> None:
  print(f'ftjax: error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with config errors reported in one line naming the key."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these from deep inside flag parsing for a bad override.
    _fail(_explain_override_error(argv) or f'invalid config override: {e!r}')
  return []


def _explain_override_error(argv: list[str]) -> str | None:
  """Names the first `--config.<key>` override whose key the config file does not define."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv[:-1]:
    path = argv[argv.index('--config') + 1]
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
  from ftjax import checkpoint, data, train, weights  # import jax only once flags are parsed

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config configs/demo.py')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for metrics, TensorBoard and config.json')
  try:
    summary = train.run(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, data.DataError, weights.CheckpointError,
          checkpoint.CheckpointError) as e:
    _fail(str(e))
  if summary['preempted_at'] is not None:
    sys.exit(train.EXIT_RESTART)


def _export(argv: list[str]) -> None:
  _join()
  from ftjax import export

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    _fail('usage: ftjax export --workdir RUN --out DIR [--format hf|peft] '
          '[--dtype bfloat16|float32]')
  if not os.path.isfile(os.path.join(_WORKDIR.value, 'config.json')):
    _fail(f'--workdir={_WORKDIR.value!r} holds no config.json: not an ftjax run directory')
  try:
    out = export.export(_WORKDIR.value, _OUT.value, fmt=_FORMAT.value, dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  print(f'exported {_WORKDIR.value} -> {out}')


def _data(argv: list[str]) -> None:
  import json

  from ftjax import data, train
  from ftjax.data import tools

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
      result = tools.bench(train.train_sources(config.data), train.data_options(config),
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


COMMANDS = {'train': _train, 'export': _export, 'data': _data, 'checkpoint': _checkpoint}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in (*COMMANDS, 'launch'):
    print(USAGE, file=sys.stderr)
    sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ('-h', '--help') else 2)
  command = sys.argv.pop(1)
  if command == 'launch':  # its own argument parser: everything after -- is the command
    from ftjax import launch

    sys.exit(launch.main(sys.argv[1:]))
  logging.set_verbosity(logging.WARNING)
  app.run(COMMANDS[command], argv=[f'ftjax {command}', *sys.argv[1:]], flags_parser=_parse_flags)


if __name__ == '__main__':
  main()
