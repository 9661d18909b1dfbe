"""The largest differences between ftjax and TRL, in tests/test_preference.py's setting.

  python benchmarks/trl_parity.py   # from the repository root; builds its tiny model itself

One batch of each preference loss (dpo, ipo against DPOTrainer; simpo against CPOTrainer; orpo
against ORPOTrainer), float32, a PEFT policy away from its adapter-free reference.
"""

import pathlib
import sys
import tempfile

sys.path.insert(0, 'tests')
import numpy as np  # noqa: E402
import test_preference as tp  # noqa: E402
from helpers import (  # noqa: E402
  add_bos_post_processor,
  add_bpe_tokenizer,
  make_hf,
  make_policy_adapter,
  write_jsonl,
)

import conftest  # noqa: E402  (8 CPU devices and the compilation cache, as the tests)

tmp = pathlib.Path(tempfile.mkdtemp())
folder = str(tmp / 'base')
make_hf('qwen3', folder, vocab_size=320)
add_bpe_tokenizer(folder, [f'{r["prompt"]}{r["completion"]}\n'
                           for r in conftest.ADDITION_TRAIN] * 4)
add_bos_post_processor(folder)
adapter = make_policy_adapter(folder, str(tmp / 'policy'))
pairs = write_jsonl(tmp / 'pairs.jsonl', tp.PAIRS)
CASES = [('dpo', 'sigmoid', dict(beta=0.3)), ('ipo', 'ipo', dict(beta=0.3)),
         ('simpo', None, dict(beta=2.0, gamma=0.5, label_smoothing=0.1)),
         ('orpo', None, dict(lambda_=0.2))]
for kind, trl_kind, obj in CASES:
  trainer, _, grads, loss, metrics, _ = tp._ours(folder, adapter, pairs, kind, **obj)
  if trl_kind:
    want_loss, want_grads, want, _ = tp._trl_dpo(folder, adapter, trl_kind, tmp / kind, beta=0.3)
  else:
    want_loss, want_grads, want = tp._trl_experimental(folder, adapter, kind, tmp / kind)
  named = tp._peft_named(trainer, grads, str(tmp / f'g_{kind}'))
  mdiff = max(abs(float(metrics[k]) - want[v]) for k, v in tp.TRL_NAMES.items())
  gdiff = max(float(np.max(np.abs(named[n] - g))) for n, g in want_grads.items())
  gscale = max(float(np.max(np.abs(g))) for g in want_grads.values())
  print(f'{kind}: loss {loss:.7f} vs TRL {want_loss:.7f} (|d| {abs(loss - want_loss):.1e}); '
        f'max |d| metrics {mdiff:.1e}; grads max |d| {gdiff:.1e} (max |g| {gscale:.1e})')
