"""ftjax: fine-tune large language models with JAX."""

from ftjax.generation import generate
from ftjax.hf.pretrained import load_pretrained, load_tokenizer, save_pretrained
from ftjax.version import __version__

__all__ = ['__version__', 'generate', 'load_pretrained', 'load_tokenizer', 'save_pretrained']
