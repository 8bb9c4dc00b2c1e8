"""transformers.pipeline on a pico export: batched generation pads, each prompt getting what it gets alone."""

import json

from transformers import AutoTokenizer, pipeline

PROMPTS = ["The painter carries", "A quiet baker finds the wooden boat behind"]


def test_batched_text_generation_equals_one_prompt_at_a_time(export):
    tokenizer = AutoTokenizer.from_pretrained(export)
    lengths = {len(tokenizer(p).input_ids) for p in PROMPTS}
    generate = pipeline("text-generation", model=str(export), device="cpu")
    greedy = dict(max_new_tokens=6, do_sample=False)
    alone = [generate(p, **greedy)[0]["generated_text"] for p in PROMPTS]
    batched = [out[0]["generated_text"] for out in generate(PROMPTS, batch_size=2, **greedy)]
    assert batched == alone and all(a != p for a, p in zip(alone, PROMPTS))
    assert len(lengths) == 2 and tokenizer.pad_token == tokenizer.eos_token  # the shorter row was padded
    assert json.loads((export / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"  # so that generate continues each row from its own last token
    rows = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    out = generate.model.generate(**rows, **greedy)
    assert tokenizer.batch_decode(out, skip_special_tokens=True) == alone
