"""The command line: each subcommand has its own flag set, and --help shows only that set."""

import pytest
from absl import flags

from ftjax import main


@pytest.mark.parametrize('command', sorted(main.COMMANDS))
def test_each_command_lists_its_own_flags(command, capsys):
  from ftjax import cli

  define, _ = main.COMMANDS[command]
  fv = flags.FlagValues()
  define(fv)
  with pytest.raises(SystemExit) as exit_:
    cli.parse(fv, [f'ftjax {command}', '--help'])
  assert exit_.value.code == 0
  shown = capsys.readouterr().out
  assert ('--config' in shown) == (command in ('train', 'data', 'checkpoint', 'bench', 'plan'))
  assert ('--format' in shown) == (command == 'export')
  assert ('--temperature' in shown) == (command == 'generate')


def test_out_and_dtype_mean_what_their_command_says():
  helps = {}
  for command in ('export', 'generate'):
    fv = flags.FlagValues()
    main.COMMANDS[command][0](fv)
    helps[command] = (fv['out'].help, fv['dtype'].parser.enum_values)
  assert '.gguf' in helps['export'][0] and 'JSONL' in helps['generate'][0]
  assert 'q8_0' in helps['export'][1] and 'q8_0' not in helps['generate'][1]
