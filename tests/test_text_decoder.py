"""``text_decoder``: the streamed text's decode goes to the tokenizer's backend directly; it
must give exactly what the tokenizer's own ``decode`` gives (special tokens skipped, no
clean-up), on any ids, special ones included."""

from __future__ import annotations

import random

from engine.checkpoint import load_tokenizer
from engine.models import default_model_dir
from engine.output import text_decoder


def test_backend_decode_equals_the_tokenizers_own(gpt2_checkpoint):
    for directory in (gpt2_checkpoint, default_model_dir()):
        tokenizer = load_tokenizer(directory)
        decode = text_decoder(tokenizer)
        rng = random.Random(7)
        special = list(tokenizer.all_special_ids)
        assert special, "the test needs special tokens to skip"
        for _ in range(300):
            ids = [rng.choice(special) if rng.random() < 0.2 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randint(0, 10))]
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False), ids


def test_a_tokenizer_without_a_backend_uses_its_own_decode():
    class Plain:
        def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
            assert skip_special_tokens and clean_up_tokenization_spaces is False
            return "-".join(map(str, ids))

    assert text_decoder(Plain())([1, 2]) == "1-2"
