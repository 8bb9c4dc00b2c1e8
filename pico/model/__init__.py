"""Single-device model code: the PicoDecoder, its config and presets, and the Hugging Face Llama adapter."""

from pico.model.decoder import PRESETS, PicoDecoder, PicoDecoderConfig
from pico.model.hf import from_pretrained, save_pretrained

__all__ = ["PRESETS", "PicoDecoder", "PicoDecoderConfig", "from_pretrained", "save_pretrained"]
