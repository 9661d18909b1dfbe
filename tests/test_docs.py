"""The docs build with mkdocs in strict mode, and the configuration reference lists every key."""

import os
import re
import subprocess
import sys

from conftest import REPO


def _config_keys(config, prefix=''):
  keys = []
  for key in config:
    value = config[key]
    if hasattr(value, 'keys'):
      keys += _config_keys(value, f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


def test_configuration_reference_lists_every_key():
  from configs import base

  with open(os.path.join(REPO, 'docs', 'configuration.md')) as f:
    documented = re.findall(r'^- `([a-z_]+\.[a-z_0-9]+)` = ', f.read(), re.MULTILINE)
  keys = _config_keys(base.get_config())
  missing = sorted(set(keys) - set(documented))
  assert not missing, f'keys of configs/base.py missing from docs/configuration.md: {missing}'
  stale = sorted(set(documented) - set(keys))
  assert not stale, f'docs/configuration.md documents keys configs/base.py lacks: {stale}'
  assert len(documented) == len(set(documented)), 'a key is documented twice'


def test_docs_build_strict(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f', os.path.join(REPO, 'mkdocs.yml'),
       '-d', str(tmp_path / 'site')], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  for page in ('index.html', 'configuration/index.html', 'generation/index.html'):
    assert (tmp_path / 'site' / page).is_file(), page
