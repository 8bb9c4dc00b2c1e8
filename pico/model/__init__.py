"""Single-device model code: the PicoDecoder, its config and presets, and the Hugging Face Llama adapter."""

from pico.model.config import PRESETS, PicoDecoderConfig
from pico.model.decoder import PicoDecoder
from pico.model.hf import save_pretrained

from_pretrained = PicoDecoder.from_pretrained

__all__ = ["PRESETS", "PicoDecoder", "PicoDecoderConfig", "from_pretrained", "save_pretrained"]
