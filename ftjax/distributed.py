"""Joining the multi-controller JAX runtime: one process per host, same command everywhere."""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

# Cluster environments where `jax.distributed.initialize()` discovers everything itself.
_AUTO_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_JOB_ID',
             'OMPI_COMM_WORLD_SIZE', 'JOBSET_NAME')


class DistributedError(RuntimeError):
  """The processes of a run could not all join."""


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
  """Fails with a clear message if process 0's coordinator never becomes reachable.

  (JAX itself aborts the whole process with a C++ check failure in that case.)
  """
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'process {process_id} could not join the run within {timeout_s}s: the coordinator '
            f'(process 0) at {address} never answered ({e.strerror or e}). Start process 0, '
            'or check the address and that the port is open.') from None
      time.sleep(0.5)


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins the other processes of this run, or does nothing for a single process.

  Explicit arguments win; then FTJAX_COORDINATOR / FTJAX_NUM_PROCESSES / FTJAX_PROCESS_ID (what
  `launch/local.py` sets); then JAX's own detection on TPU VMs, SLURM, Open MPI and Kubernetes
  JobSets. A process that does not join within `timeout_s` makes the others fail with a message
  that names the coordinator and the expected number of processes instead of hanging.
  """
  coordinator = coordinator or os.environ.get('FTJAX_COORDINATOR')
  if num_processes is None and os.environ.get('FTJAX_NUM_PROCESSES'):
    num_processes = int(os.environ['FTJAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('FTJAX_PROCESS_ID'):
    process_id = int(os.environ['FTJAX_PROCESS_ID'])
  explicit = coordinator is not None
  if not explicit and not any(k in os.environ for k in _AUTO_ENV):
    return  # a single process: nothing to join
  if explicit and (num_processes is None or process_id is None):
    raise DistributedError('a coordinator address needs num_processes and process_id too '
                           '(FTJAX_NUM_PROCESSES / FTJAX_PROCESS_ID)')
  if explicit and num_processes == 1:
    return
  if explicit and process_id != 0:
    _wait_for_coordinator(coordinator, process_id, timeout_s)
  elif explicit:
    logging.warning('process 0 waiting up to %ds for %d processes at %s', timeout_s,
                    num_processes, coordinator)
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
  except Exception as e:  # JAX raises XlaRuntimeError / RuntimeError / ValueError here
    who = f'process {process_id}' if process_id is not None else 'this process'
    raise DistributedError(
        f'{who} could not join the run within {timeout_s}s (coordinator {coordinator or "auto"}, '
        f'expecting {num_processes or "auto"} processes): at least one process never '
        f'connected. Check that every host started the same command and that the port is '
        f'reachable. ({type(e).__name__}: {str(e).splitlines()[0][:300]})') from None
  logging.info('joined as process %d of %d (%d local devices, %d global)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
