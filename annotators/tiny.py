"""The byte-level BPE vocabulary of the tiny random-weight checkpoints built offline for tests and the demo.

`annotators.florence2.build_tiny_florence2` (a RoBERTa/BART tokenizer) and `annotators.vlm.tiny.build_tiny_vlm`
(a Qwen2 tokenizer) both train one on a few phrases with the `tokenizers` library, then hand the vocabulary
and merges to the transformers tokenizer class their processor expects.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def train_byte_bpe(corpus: Sequence[str], vocab_size: int,
                   special_tokens: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on `corpus` x 20; `special_tokens` get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        list(corpus) * 20,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    m = json.loads(bpe.to_str())["model"]
    return m["vocab"], [tuple(x) for x in m["merges"]]
