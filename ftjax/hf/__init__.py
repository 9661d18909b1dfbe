"""Hugging Face interop: model folders (config.json + safetensors) in and out of ftjax."""
