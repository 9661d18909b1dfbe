"""Command-line plumbing every subcommand shares: its own flag set, one-line errors, joining
the processes of a multi-host run."""

from __future__ import annotations

import os
import runpy
import sys

from absl import flags
from ml_collections import config_flags


def config_flag(fv: flags.FlagValues) -> flags.FlagHolder:
  return config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/*.py); override keys with --config.<section>.<key>=v.',
      lock_config=True, flag_values=fv)


def distributed_flags(fv: flags.FlagValues) -> None:
  """The flags of `join`, for commands that may run on several processes."""
  flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0, for clusters JAX does not detect '
      '(default: $FTJAX_COORDINATOR; TPU VMs, SLURM and JobSets are detected).', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'processes in the run.', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1.', flag_values=fv)
  flags.DEFINE_integer('distributed_timeout', None, 'seconds to wait for every process to join '
                       '(default 300).', flag_values=fv)


def join(fv: flags.FlagValues) -> None:
  """jax.distributed.initialize as `distributed_flags` (or the cluster) say."""
  from ftjax import distributed

  timeout = fv.distributed_timeout or int(os.environ.get('FTJAX_DISTRIBUTED_TIMEOUT', 300))
  try:
    distributed.initialize(coordinator=fv.coordinator_address, num_processes=fv.num_processes,
                           process_id=fv.process_id, timeout_s=timeout)
  except distributed.DistributedError as e:
    fail(str(e))


def fail(message: str) -> None:
  print(f'ftjax: error: {message}', file=sys.stderr)
  sys.exit(2)


def config_path(argv: list[str]) -> str | None:
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv[:-1]:
    path = argv[argv.index('--config') + 1]
  return path


def _check_config_file(argv: list[str]) -> None:
  """A missing or unparsable `--config` file, named in one line before absl loads it."""
  path = config_path(argv)
  if not path:
    return
  file = path.partition(':')[0]
  if not os.path.isfile(file):
    fail(f'--config={path!r}: file not found')
  try:
    with open(file, encoding='utf-8') as f:
      compile(f.read(), file, 'exec')
  except SyntaxError as e:
    fail(f'{file}:{e.lineno}: {e.msg} (a syntax error in the config file)')
  except (OSError, UnicodeDecodeError) as e:
    fail(f'--config={path!r}: cannot read it ({e})')


def parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl parsing of one command's flags, with config errors reported in one line naming the
  key. absl's own FLAGS (logging) are marked parsed with their defaults."""
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(f'{argv[0]} flags:\n{flag_values.get_help()}')
    sys.exit(0)
  _check_config_file(argv)
  flags.FLAGS(argv[:1])
  try:
    return flag_values(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these from deep inside flag parsing for a bad override.
    fail(_explain_override_error(argv) or f'invalid config override: {e!r}')
  except Exception as e:  # noqa: BLE001 (the config file's own code failed: NameError, ...)
    cause = e.__cause__ or e
    fail(f'--config={config_path(argv)!r} failed to load: {type(cause).__name__}: '
          f'{str(cause).splitlines()[0] if str(cause) else ""}')
  return []


def _explain_override_error(argv: list[str]) -> str | None:
  """Names the first `--config.<key>` override whose key the config file does not define."""
  path = config_path(argv)
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


def describe(e: BaseException) -> str:
  """One line for an error in what the user gave us (a file, a folder, a value)."""
  if isinstance(e, UnicodeDecodeError):
    return f'not valid UTF-8 ({e.reason} at byte {e.start})'
  if isinstance(e, OSError) and e.filename:
    return f'{e.filename}: {e.strerror or e}'
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def guarded(command, argv: list[str]) -> None:
  """Runs a command; user errors (by type: ours, files, bytes) end as one line and exit 2."""
  from ftjax.errors import UserError

  try:
    command(argv)
  except (UserError, OSError, UnicodeDecodeError) as e:
    fail(describe(e))
