"""Greedy agreement with a reference model: does a fine-tuned model still answer as the model it came from?

On a self-distilled data set (``msn distill``) the held-out responses are the base model's own greedy
answers, so a trained model that regenerates them token for token has kept the base model's behaviour;
this is the quality check that matters when the training target is "be the same model, but denoise".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from msn.data import Record


def greedy_agreement(model, tokenizer, records: Sequence[Record], batch_size: int = 16) -> dict[str, float]:
    """Regenerate each record's assistant answer greedily from its first user turn and compare the text.

    Text, not token ids: a decoded answer need not re-tokenize to the ids that produced it. Each answer gets
    the reference's token count plus a margin. ``exact``: share of answers that reproduce the reference (it
    is a prefix of the new answer); ``prefix``: mean share of the reference's characters reproduced before
    the first difference.
    """
    from msn.distill import greedy_batch, pad_id_for
    from msn.prompting import encode_prompt, eos_ids

    eos = eos_ids(model, tokenizer)
    pad_id = pad_id_for(tokenizer, eos)
    pairs = []
    for r in records:
        user = next(m["content"] for m in r.messages if m["role"] == "user")
        answer = next(m["content"] for m in r.messages if m["role"] == "assistant")
        pairs.append((user, answer, len(tokenizer(answer, add_special_tokens=False)["input_ids"])))
    exact = prefix = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        budget = max(n for _, _, n in chunk) + 8
        got = greedy_batch(model, [encode_prompt(tokenizer, u)[0] for u, _, _ in chunk], budget, eos, pad_id)
        for (_, ref, _), (new, _) in zip(chunk, got, strict=True):
            text = tokenizer.decode(new, skip_special_tokens=True)
            n = len(os.path.commonprefix([ref, text]))
            exact += n == len(ref)
            prefix += n / max(len(ref), 1)
    count = max(len(pairs), 1)
    return {"exact": exact / count, "prefix": prefix / count, "samples": len(pairs)}
