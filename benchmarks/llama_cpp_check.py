"""Do llama.cpp and ftjax compute the same thing from one GGUF file (an `ftjax export --format
gguf` output, or any file ftjax reads)?

llama-cpp-python is not a dependency of ftjax; run the first half with a Python that has it
(`pip install llama-cpp-python`), the second with ftjax's:

  python benchmarks/llama_cpp_check.py run FILE.gguf [...] --out /tmp/lcpp      # llama.cpp side
  python benchmarks/llama_cpp_check.py compare --out /tmp/lcpp                  # ftjax side

`run` stores llama.cpp's token ids and logits for a few prompts (English, German, Japanese) and
its greedy chat completion (the file's embedded chat template); `compare` prints, per file and
prompt, whether ftjax's tokenizer gives the same ids, the largest logit difference, whether
every position's argmax agrees, and both greedy chat completions.
"""

import argparse
import json
import os

TEXTS = ['Extract the person as JSON.\nAnna (41) repairs bicycles in Graz.',
         'Der schnelle braune Fuchs springt über den faulen Hund.',
         '素早い茶色の狐がのろまな犬を飛び越える。']


def run(files, out):
  import llama_cpp
  import numpy as np

  os.makedirs(out, exist_ok=True)
  results = {}
  for n, path in enumerate(files):
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=256, verbose=False)
    entry = {'ids': []}
    for i, text in enumerate(TEXTS):
      ids = llm.tokenize(text.encode(), add_bos=False, special=True)
      llm.reset()
      llm.eval(ids)
      np.save(os.path.join(out, f'{n}.{i}.npy'), np.array(llm.scores[:len(ids)], np.float32))
      entry['ids'].append(ids)
    chat = llm.create_chat_completion(messages=[{'role': 'user', 'content': TEXTS[0]}],
                                      temperature=0.0, top_k=1, max_tokens=24)
    entry['chat'] = chat['choices'][0]['message']['content']
    results[path] = entry
  with open(os.path.join(out, 'llama_cpp.json'), 'w') as f:
    json.dump(results, f, ensure_ascii=False)


def compare(out):
  import jax
  import numpy as np

  import ftjax
  from ftjax import generation, tokenizer

  with open(os.path.join(out, 'llama_cpp.json')) as f:
    results = json.load(f)
  for n, (path, entry) in enumerate(results.items()):
    tok = tokenizer.load(path)
    model = ftjax.load_pretrained(path, dtype='float32')
    for i, text in enumerate(TEXTS):
      theirs = np.load(os.path.join(out, f'{n}.{i}.npy'))
      ours = np.asarray(model(jax.numpy.asarray([entry['ids'][i]])))[0]
      print(json.dumps({'file': path, 'prompt': i, 'ids_equal': tok.encode(text) == entry['ids'][i],
                        'max_abs_logit_diff': float(np.abs(ours - theirs).max()),
                        'argmax_equal': bool((ours.argmax(-1) == theirs.argmax(-1)).all())}))
    prompt = tok.apply_chat_template([{'role': 'user', 'content': TEXTS[0]}],
                                     add_generation_prompt=True)
    done = generation.complete(model, [tok.encode(prompt)], stop_ids=[tok.eos_id],
                               decode=tok.decode, max_new_tokens=24)
    print(json.dumps({'file': path, 'llama_cpp_chat': entry['chat'],
                      'ftjax_chat': done[0]['completion']}, ensure_ascii=False))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('action', choices=('run', 'compare'))
  parser.add_argument('files', nargs='*')
  parser.add_argument('--out', default='/tmp/llama_cpp_check')
  args = parser.parse_args()
  if args.action == 'run':
    run(args.files, args.out)
  else:
    compare(args.out)


if __name__ == '__main__':
  main()
