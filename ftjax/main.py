"""The `ftjax` command: one flag set and one function per subcommand (train, export, generate,
plot, data, checkpoint, bench, plan; launch has its own parser), then a hand-off to the library.

  ftjax train --config configs/X.py [--config.a.b=v ...] --workdir DIR
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging

from ftjax import cli

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
          data audit --config X [--source FILE] [--out DIR] [--strict]   (what the data is)
  checkpoint bench --config X     (blocking vs total time of an async checkpoint save)
  bench   time the real train step: ftjax bench --config X [--steps N]  (tokens/s, MFU, memory)
          ftjax bench --calibrate   (measure and cache this machine's matmul peak again)
  plan    compile the train step for a TPU slice from this machine and say if it fits:
          ftjax plan --config X --topology v5p-64
  launch  --local N --devices-per-process M -- ftjax train ...   (N processes on this machine)
"""


# ------------------------------------------------------------------ flags, one set per command


def _train_flags(fv: flags.FlagValues) -> None:
  cli.config_flag(fv)
  flags.DEFINE_string('workdir', None, 'Run directory: metrics, TensorBoard, config.json.',
                      flag_values=fv)
  cli.distributed_flags(fv)


def _export_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'The run directory to export.', flag_values=fv)
  flags.DEFINE_string('out', None, 'The Hugging Face (or PEFT) folder, or the .gguf file, to '
                      'write.', flag_values=fv)
  flags.DEFINE_enum('format', 'hf', ['hf', 'peft', 'gguf'],
                    'hf (full model; LoRA merged), peft (adapter folder) or gguf (one llama.cpp '
                    'file; LoRA merged).', flag_values=fv)
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16', 'f32', 'f16', 'bf16',
                                    'q8_0'],
                    'dtype of the written weights (default: that of the weights the run started '
                    'from: the base folder\'s torch_dtype, float32 for a GGUF, else '
                    'model.param_dtype); q8_0 (and the f32/f16/bf16 spellings) for --format '
                    'gguf.', flag_values=fv)
  flags.DEFINE_boolean('overwrite', False, 'replace a non-empty --out folder (never the run, '
                       'its base model, adapter or tokenizer).', flag_values=fv)
  cli.distributed_flags(fv)


def _generate_flags(fv: flags.FlagValues) -> None:
  define = dict(flag_values=fv)
  flags.DEFINE_string('workdir', None, 'A run directory to sample from.', **define)
  flags.DEFINE_string('pretrained', None, 'A Hugging Face model folder to sample from.', **define)
  flags.DEFINE_string('adapter', None, 'A PEFT adapter on --pretrained.', **define)
  flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat for a batch).', **define)
  flags.DEFINE_string('prompts', None, 'A JSONL file of prompts: {"prompt": ...} or '
                      '{"messages": [...]} per line.', **define)
  flags.DEFINE_integer('max-new-tokens', 64, 'Tokens to generate per prompt.', **define)
  flags.DEFINE_float('temperature', 0.0, '0 = greedy.', **define)
  flags.DEFINE_integer('top-k', 0, 'Sample among the k likeliest (0 = all).', **define)
  flags.DEFINE_float('top-p', 1.0, 'Nucleus sampling mass (1 = all).', **define)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.', **define)
  flags.DEFINE_boolean('chat', False, 'Wrap each prompt in the chat template.', **define)
  flags.DEFINE_multi_string('stop', [], 'A token (its text) that ends a completion, besides '
                            'EOS (repeatable).', **define)
  flags.DEFINE_integer('batch-size', 8, 'Prompts per batch.', **define)
  flags.DEFINE_string('out', None, 'A JSONL file of the completions (- = stdout).', **define)
  flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                    'Compute dtype (default float32 on CPU, else bfloat16).', **define)
  cli.distributed_flags(fv)


def _plot_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'The run directory.', flag_values=fv)
  flags.DEFINE_string('out', None, 'The PNG to write (default: RUN/loss.png).', flag_values=fv)


def _data_flags(fv: flags.FlagValues) -> None:
  cli.config_flag(fv)
  flags.DEFINE_string('source', None, 'prepare: the source to convert; audit: one file to audit '
                      "(with --config: its tokenizer and settings) instead of the run's sources.",
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'prepare: the ArrayRecord file to write; audit: the report '
                      'folder (default: ./audit).', flag_values=fv)
  flags.DEFINE_boolean('strict', False, 'audit: exit 1 when a share exceeds its audit.* '
                       'threshold.', flag_values=fv)
  flags.DEFINE_string('split', '', 'prepare: split of a tfds:// source.', flag_values=fv)
  flags.DEFINE_integer('batches', 50, 'bench: batches to time.', flag_values=fv)


def _checkpoint_flags(fv: flags.FlagValues) -> None:
  cli.config_flag(fv)
  flags.DEFINE_string('workdir', None, 'Where the timed checkpoint is written (a temporary '
                      'folder inside it; default: the system temp dir).', flag_values=fv)


def _bench_flags(fv: flags.FlagValues) -> None:
  cli.config_flag(fv)
  flags.DEFINE_integer('steps', 10, 'Train steps to time (after 2 warm-up steps).',
                       flag_values=fv)
  flags.DEFINE_bool('calibrate', False, 'Measure the matmul peak FLOP/s of this machine again '
                    '(CPUs and devices not in the table), cache it and print its record; no '
                    '--config needed.', flag_values=fv)
  flags.DEFINE_multi_string('vs', [], 'section.key=value: also time the config with these '
                            'overrides, side by side with it (steps called alternately), and '
                            'print both and their tokens/s ratio.', flag_values=fv)


def _plan_flags(fv: flags.FlagValues) -> None:
  cli.config_flag(fv)
  flags.DEFINE_string('topology', None, 'A TPU accelerator type as gcloud spells it (v4-32, '
                      'v5litepod-8 or v5e-8, v5p-64, v6e-8).', flag_values=fv)


# ------------------------------------------------------------------ the commands


def _train(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.join(fv)
  from ftjax import train  # import jax only once flags are parsed

  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {argv[1:]}')
  if fv.config is None:
    cli.fail('--config is required, e.g. --config configs/demo.py')
  if not fv.workdir:
    cli.fail('--workdir is required: the directory for metrics, TensorBoard and config.json')
  try:
    summary = train.run(fv.config, fv.workdir)
  except train.NonFiniteError as e:
    print(f'ftjax: error: {e}', file=sys.stderr)
    sys.exit(1)
  if summary['preempted_at'] is not None:
    sys.exit(train.EXIT_RESTART)


def _export(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.join(fv)
  from ftjax import export

  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {argv[1:]}')
  if not fv.workdir or not fv.out:
    cli.fail('usage: ftjax export --workdir RUN --out DIR|FILE.gguf [--format hf|peft|gguf] '
          '[--dtype float32|bfloat16|float16|q8_0] [--overwrite]')
  if not os.path.isfile(os.path.join(fv.workdir, 'config.json')):
    cli.fail(f'--workdir={fv.workdir!r} holds no config.json: not an ftjax run directory')
  try:
    out = export.export(fv.workdir, fv.out, fmt=fv.format,
                        dtype=fv.dtype, overwrite=fv.overwrite)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  print(f'exported {fv.workdir} -> {out}')


def _data(fv: flags.FlagValues, argv: list[str]) -> None:
  import json

  from ftjax import config as config_lib
  from ftjax import data
  from ftjax.data import bench as data_bench

  action = argv[1] if len(argv) == 2 else None
  if action == 'prepare':
    if not fv.source or not fv.out:
      cli.fail('usage: ftjax data prepare --source FILE --out FILE.array_record [--split S]')
    try:
      count = data.prepare(fv.source, fv.out, split=fv.split)
    except data.DataError as e:
      cli.fail(str(e))
    print(f'wrote {count} records to {fv.out}')
  elif action == 'bench':
    if fv.config is None:
      cli.fail('usage: ftjax data bench --config configs/X.py [--batches N]')
    config = fv.config
    try:
      r = config_lib.resolve(config)
      result = data_bench.bench(list(r.data.sources), r.data.options,
                                global_batch=r.data.global_batch, seed=r.train.seed,
                                pack=r.data.pack, workers=r.data.workers, batches=fv.batches)
    except (config_lib.ConfigError, data.DataError) as e:
      cli.fail(str(e))
    print(json.dumps(result))
  elif action == 'audit':
    from ftjax.data import audit

    if fv.config is None and not fv.source:
      cli.fail('usage: ftjax data audit --config configs/X.py [--source FILE] [--out DIR] '
               '[--strict]')
    try:
      code = audit.run(fv.config, source=fv.source, out=fv.out or 'audit', strict=fv.strict)
    except (config_lib.ConfigError, data.DataError) as e:
      cli.fail(str(e))
    sys.exit(code)
  else:
    cli.fail('usage: ftjax data prepare|bench|audit ...')


def _checkpoint(fv: flags.FlagValues, argv: list[str]) -> None:
  import json
  import tempfile

  from ftjax import checkpoint, trainer
  from ftjax import config as config_lib

  if argv[1:] != ['bench'] or fv.config is None:
    cli.fail('usage: ftjax checkpoint bench --config configs/X.py [--config.model.<field>=...]')
  config = fv.config
  try:
    r = config_lib.resolve(config, check_files=False)
    state = trainer.setup(
        arch=r.model.arch, model_options=dict(param_dtype=config_lib.DTYPES[r.model.param_dtype]),
        mesh_shape=r.mesh.shape, rules_name=r.mesh.rules, optim_kwargs=r.optim.make_kwargs(),
        grad_accum=1, global_batch=r.data.global_batch, seed=0,
        pretrained_path=r.model.pretrained).state
  except config_lib.ConfigError as e:
    cli.fail(str(e))
  with tempfile.TemporaryDirectory(dir=fv.workdir) as root:
    print(json.dumps(checkpoint.bench(state, root)))


def _read_prompts(fv: flags.FlagValues) -> list[dict]:
  import json

  records = [{'prompt': p} for p in fv.prompt]
  if fv.prompts:
    try:
      with open(fv.prompts, encoding='utf-8') as f:
        records += [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
      cli.fail(f'--prompts={fv.prompts!r}: {e}')
  if not records:
    cli.fail('no prompts: pass --prompt TEXT (repeatable) or --prompts FILE.jsonl')
  return records


def _generate(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.join(fv)
  import json
  import time

  import jax

  from ftjax import config as config_lib
  from ftjax import data, generation, sharding, trained
  from ftjax.errors import CheckpointError
  from ftjax.hf import pretrained

  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {argv[1:]}')
  if bool(fv.workdir) == bool(fv.pretrained):
    cli.fail('usage: ftjax generate --workdir RUN | --pretrained HF_DIR [--prompt TEXT | '
          '--prompts FILE.jsonl] [--max-new-tokens N] [--temperature T]')
  if fv.adapter and not fv.pretrained:
    cli.fail('--adapter needs --pretrained (the base the adapter was trained on)')
  try:
    generation.check_sampling(max_new_tokens=fv['max-new-tokens'].value, temperature=fv.temperature,
                              top_k=fv['top-k'].value, top_p=fv['top-p'].value,
                              batch_size=fv['batch-size'].value, flag_names=True)
  except generation.GenerationError as e:
    cli.fail(str(e))
  records = _read_prompts(fv)
  dtype = fv.dtype or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  # Architecture, tokenizer and prompts first (cheap), so the KV cache is checked before any
  # weight is read. The rules are the ones `trained.for_generation` lays the model out by.
  try:
    if fv.workdir:
      run = trained.read_run(fv.workdir)
      arch, tok_spec = run.model.arch, run.data.options.tokenizer
      rules_name, source = run.mesh.rules, f'--workdir={fv.workdir}'
    else:
      arch, tok_spec = pretrained.read_config(fv.pretrained), fv.pretrained
      rules_name, source = 'fsdp_tp', f'--pretrained={fv.pretrained}'
      source += f' with --adapter={fv.adapter}' if fv.adapter else ''
    tok = data.formats.cached_tokenizer(tok_spec)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    cli.fail(str(e))
  encoder = data.formats.Encoder(tok_spec)
  try:
    prompts, _ = zip(*(encoder.prompt(r, chat=fv.chat) for r in records), strict=True)
  except (data.formats.BadRecord, ValueError) as e:
    cli.fail(f'prompt: {e}')
  stop_ids = [tok.eos_id]
  for text in fv.stop:
    ids = tok.encode(text)
    if len(ids) != 1:
      cli.fail(f'--stop={text!r} is {len(ids)} tokens; a stop must be a single token')
    stop_ids += ids
  mesh = sharding.make_mesh((1, -1, 1))
  base = fv.pretrained or run.model.pretrained
  try:
    generation.check_cache_fits(
        arch, batch=min(fv['batch-size'].value, len(prompts)),
        prompt_length=max(len(p) for p in prompts), max_new_tokens=fv['max-new-tokens'].value,
        dtype=config_lib.DTYPES[dtype], flag_names=True,
        batch_shards=sharding.batch_shards(mesh, sharding.get_rules(rules_name)))
    generation.check_context(pretrained.max_context(base) if base else None,
                             prompt_length=max(len(p) for p in prompts),
                             max_new_tokens=fv['max-new-tokens'].value, source=base or source)
    model, _, mesh, rules = trained.for_generation(
        pretrained_path=fv.pretrained or '', adapter=fv.adapter or '',
        workdir=fv.workdir or '', dtype=config_lib.DTYPES[dtype], mesh=mesh)
    generation.check_finite(model, source)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    cli.fail(str(e))
  start = time.perf_counter()
  results = generation.complete(
      model, [list(p) for p in prompts], batch_size=fv['batch-size'].value, stop_ids=stop_ids,
      decode=tok.decode, mesh=mesh, rules=rules, max_new_tokens=fv['max-new-tokens'].value,
      temperature=fv.temperature, top_k=fv['top-k'].value or None,
      top_p=fv['top-p'].value if fv['top-p'].value < 1.0 else None, seed=fv.seed)
  if jax.process_index() != 0:
    return
  new_tokens = sum(len(r['tokens']) for r in results)
  print(f'generated {new_tokens} tokens for {len(results)} prompts in '
        f'{time.perf_counter() - start:.1f}s (compilation included)', file=sys.stderr)
  rows = [{**r, 'prompt_tokens': len(p), **result}
          for r, p, result in zip(records, prompts, results, strict=True)]
  if fv.out and fv.out != '-':
    with open(fv.out, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
  for i, row in enumerate(rows):
    if fv.out == '-':
      print(json.dumps(row))
    else:
      shown = row['prompt'] if 'prompt' in row else tok.decode(prompts[i])
      print(f'--- {i}\n{shown}{row["completion"]}')


def _plot(fv: flags.FlagValues, argv: list[str]) -> None:
  from ftjax import plot

  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {argv[1:]}')
  if not fv.workdir:
    cli.fail('usage: ftjax plot --workdir RUN [--out FILE.png]')
  try:
    out = plot.plot(fv.workdir, fv.out)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  print(f'wrote {out}')


def _bench(fv: flags.FlagValues, argv: list[str]) -> None:
  import json

  from ftjax import bench
  from ftjax.config import ConfigError

  if fv.calibrate and len(argv) == 1:
    print(json.dumps(bench.calibrate(fv.config)))
    return
  if len(argv) > 1 or fv.config is None:
    cli.fail('usage: ftjax bench --config configs/X.py [--steps N] [--config.KEY=VALUE ...] '
             '[--vs KEY=VALUE ...] | '
             'ftjax bench --calibrate [--config configs/X.py]')
  try:
    if not fv.vs:
      result = bench.run(fv.config, steps=fv.steps)
    else:
      out = bench.side_by_side({'base': fv.config,
                                'vs': bench.with_overrides(fv.config, fv.vs)}, steps=fv.steps)
      result = dict(out, overrides=fv.vs,
                    vs_over_base=out['vs']['tokens_per_s'] / out['base']['tokens_per_s'])
  except ConfigError as e:
    cli.fail(str(e))
  print(json.dumps(result))


def _plan(fv: flags.FlagValues, argv: list[str]) -> None:
  import json

  from ftjax import plan
  from ftjax.config import ConfigError

  if len(argv) > 1 or fv.config is None or not fv.topology:
    cli.fail('usage: ftjax plan --config configs/X.py --topology v5p-64 [--config.KEY=VALUE ...]')
  try:
    result = plan.run(fv.config, fv.topology)
  except (ConfigError, plan.PlanError) as e:
    cli.fail(str(e))
  print(json.dumps(result))


COMMANDS = {'train': (_train_flags, _train), 'export': (_export_flags, _export),
            'generate': (_generate_flags, _generate), 'plot': (_plot_flags, _plot),
            'data': (_data_flags, _data), 'checkpoint': (_checkpoint_flags, _checkpoint),
            'bench': (_bench_flags, _bench), 'plan': (_plan_flags, _plan)}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in (*COMMANDS, 'launch'):
    print(USAGE, file=sys.stderr)
    sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ('-h', '--help') else 2)
  command = sys.argv.pop(1)
  if command == 'launch':  # its own argument parser: everything after -- is the command
    from ftjax import launch

    sys.exit(launch.main(sys.argv[1:]))
  logging.set_verbosity(logging.WARNING)
  define, run = COMMANDS[command]
  fv = flags.FlagValues()
  define(fv)
  app.run(functools.partial(cli.guarded, functools.partial(run, fv)),
          argv=[f'ftjax {command}', *sys.argv[1:]],
          flags_parser=functools.partial(cli.parse, fv))


if __name__ == '__main__':
  main()
