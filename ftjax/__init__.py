"""ftjax: fine-tune large language models with JAX."""

from ftjax.pretrained import load_pretrained, load_tokenizer, save_pretrained

__all__ = ['load_pretrained', 'load_tokenizer', 'save_pretrained']
__version__ = '0.1.0'
