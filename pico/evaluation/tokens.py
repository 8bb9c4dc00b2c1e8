"""Text to token ids exactly as lm-evaluation-harness's HFLM encodes (context, continuation) requests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from pico.evaluation.task import TaskError
from pico.model.hf import first_special_token


class Encoder:
    """A `tokenizers.Tokenizer` plus the token that conditions an empty context (HFLM's `prefix_token_id`);
    None for a tokenizer without a BOS/EOS token, which then takes no request with an empty context."""

    def __init__(self, tokenizer: Tokenizer, prefix_id: int | None):
        self.tokenizer, self.prefix_id = tokenizer, prefix_id
        self.prefix_text = (
            None if prefix_id is None else tokenizer.decode([prefix_id], skip_special_tokens=False)
        )

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens added unless `text` starts with the prefix."""
        special = special and not (self.prefix_text and text.startswith(self.prefix_text))
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): the continuation is the tail of encode(context + continuation).

        Trailing spaces of the context move to the continuation; an empty context becomes the prefix token.
        """
        if not context:
            if self.prefix_id is None:
                raise TaskError("tokenizer: no BOS/EOS token to condition an empty context on")
            ids = self.encode(continuation, special=False)
            return ([self.prefix_id], ids) if ids[:1] != [self.prefix_id] else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head) :]


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def load_encoder(tokenizer: Tokenizer | str | Path) -> Encoder:
    """An Encoder from a Tokenizer, a tokenizer.json or a model dir holding one (+ tokenizer_config.json).

    The prefix is the BOS token of tokenizer_config.json / special_tokens_map.json, else their EOS token, else
    (pico's convention, as its exported model dirs) the tokenizer's first special token, else None: only a
    request with an empty context needs one (`Encoder.pair` raises then), not decoding or other contexts.
    """
    names: dict = {}
    if not isinstance(tokenizer, Tokenizer):
        path = Path(tokenizer)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.is_file():
            raise TaskError(f"tokenizer: {file} does not exist")
        for extra in (
            "special_tokens_map.json",
            "tokenizer_config.json",
        ):  # the latter wins, as in transformers
            if (folder / extra).is_file():
                names.update(
                    {k: v for k, v in json.loads((folder / extra).read_text()).items() if v is not None}
                )
        tokenizer = Tokenizer.from_file(str(file))
    for key in ("bos_token", "eos_token"):
        name = _token_name(names.get(key))
        if name is not None and tokenizer.token_to_id(name) is not None:
            return Encoder(tokenizer, tokenizer.token_to_id(name))
    first = first_special_token(tokenizer)
    return Encoder(tokenizer, None if first is None else first[0])
