"""ftjax: fine-tune large language models with JAX."""

from ftjax.pretrained import load_pretrained, load_tokenizer, save_pretrained
from ftjax.version import __version__

__all__ = ['__version__', 'load_pretrained', 'load_tokenizer', 'save_pretrained']
