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
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'export: dtype of the written weights.')

USAGE = """usage: ftjax COMMAND [flags]

commands:
  train   fine-tune a model: ftjax train --config configs/demo.py --workdir /tmp/demo
  export  write a run as a Hugging Face folder: ftjax export --workdir RUN --out HF_DIR
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


def _train(argv: list[str]) -> None:
  from ftjax import train  # import jax only once flags are parsed

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config configs/demo.py')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for metrics, TensorBoard and config.json')
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, train.data.DataError, train.weights.CheckpointError) as e:
    _fail(str(e))


def _export(argv: list[str]) -> None:
  from ftjax import pretrained

  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    _fail('usage: ftjax export --workdir RUN --out HF_DIR [--dtype bfloat16|float32]')
  if not os.path.isfile(os.path.join(_WORKDIR.value, 'config.json')):
    _fail(f'--workdir={_WORKDIR.value!r} holds no config.json: not an ftjax run directory')
  try:
    out = pretrained.export(_WORKDIR.value, _OUT.value, dtype=_DTYPE.value)
  except FileNotFoundError as e:
    _fail(str(e))
  print(f'exported {_WORKDIR.value} -> {out}')


COMMANDS = {'train': _train, 'export': _export}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(USAGE, file=sys.stderr)
    sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ('-h', '--help') else 2)
  command = sys.argv.pop(1)
  logging.set_verbosity(logging.WARNING)
  app.run(COMMANDS[command], argv=[f'ftjax {command}', *sys.argv[1:]], flags_parser=_parse_flags)


if __name__ == '__main__':
  main()
