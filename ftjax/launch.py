"""Run an ftjax command as N local processes joined over 127.0.0.1, each with fake CPU devices.

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      ftjax train --config configs/demo.py --workdir /tmp/demo2
  ftjax launch --local 2 --devices-per-process 4 -- ftjax train ...

Debug multi-host logic on a laptop: every process gets FTJAX_COORDINATOR (a free 127.0.0.1 port),
FTJAX_NUM_PROCESSES, FTJAX_PROCESS_ID and JAX_NUM_CPU_DEVICES. Output lines are prefixed with
`[i]`. If any process fails, the others are stopped and the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(index: int, stream, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(f'[{index}] {line}')
    out.flush()


def launch(command: list[str], *, processes: int, devices_per_process: int,
           timeout_s: int = 300) -> int:
  """Starts the processes, streams their output, and returns the run's exit status."""
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, FTJAX_COORDINATOR=f'127.0.0.1:{port}',
               FTJAX_NUM_PROCESSES=str(processes), FTJAX_PROCESS_ID=str(i),
               FTJAX_DISTRIBUTED_TIMEOUT=str(timeout_s),
               JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)  # --xla_force_host_platform_device_count would override
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  status = 0
  pending = set(range(processes))
  while pending:
    for i in list(pending):
      code = procs[i].poll()
      if code is None:
        continue
      pending.discard(i)
      if code != 0 and status == 0:
        status = code
        print(f'[launch] process {i} exited with {code}; stopping the others', file=sys.stderr)
        for j in pending:
          procs[j].terminate()
    if pending:
      with contextlib.suppress(subprocess.TimeoutExpired):
        procs[min(pending)].wait(timeout=0.2)
  for t in pumps:
    t.join(timeout=5)
  return status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', '--local', type=int, required=True)
  parser.add_argument('--devices-per-process', type=int, default=1)
  parser.add_argument('--timeout', type=int, default=300,
                      help='seconds a process waits for the others to join')
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                timeout_s=args.timeout)


