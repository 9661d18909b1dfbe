"""One table from the `ftjax bench` outputs of a benchmarks/gpu.sh run (the last JSON line of
each bench_*.txt in the folder), also written there as summary.json.

  python benchmarks/gpu_summary.py benchmarks/results/gpu-20261203T120000Z
"""

from __future__ import annotations

import json
import pathlib
import sys


def last_json(path: pathlib.Path) -> dict | None:
  """The last line of `path` that parses as a JSON object, or None."""
  for line in reversed(path.read_text().splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def summarize(folder: pathlib.Path) -> dict[str, dict]:
  rows = {}
  for path in sorted(folder.glob('bench_*.txt')):
    result = last_json(path)
    name = path.stem.removeprefix('bench_')
    if result is None:
      rows[name] = {'error': f'no JSON result in {path}'}
      continue
    rows[name] = dict(tokens_per_s=result['tokens_per_s'], step_s=result['step_s']['median'],
                      mfu=result['mfu'], peak_source=result['peak_source'],
                      compiled_memory_gb=result['peak_memory_bytes']['compiled'] / 1e9,
                      device_kind=result['device_kind'], shapes=result['shapes'])
  return rows


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__, file=sys.stderr)
    return 2
  folder = pathlib.Path(argv[1])
  rows = summarize(folder)
  for name, row in rows.items():
    if 'error' in row:
      print(f'{name:10s} {row["error"]}')
    else:
      print(f'{name:10s} {row["tokens_per_s"]:10.0f} tokens/s  step {row["step_s"]:.3f} s  '
            f'MFU {100 * row["mfu"]:5.1f}%  memory {row["compiled_memory_gb"]:.1f} GB  '
            f'({row["device_kind"]}, {row["peak_source"]})')
  (folder / 'summary.json').write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
