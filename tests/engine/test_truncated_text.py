"""A request cut by ``max_tokens`` in the middle of a multi-byte character ends its text
without U+FFFD, while its token ids keep every byte (the engine on a tiny random-weight
Llama with the default tokenizer, whose byte-level tokens split characters)."""

from __future__ import annotations

from engine_helpers import greedy_tokens
from test_tiny_models import make_engine, save_tiny

from scission.engine.config import AttentionBackendKind
from scission.engine.request import FinishReason, SamplingParams


def test_text_cut_mid_character_by_max_tokens_has_no_replacement_char(tmp_path, tokenizer):
    """Greedy outputs of 40 prompts are scanned for the first prefix that ends inside a
    character (decode() ends in U+FFFD); rerun with max_tokens = that length, the request
    finishes "length" with exactly those ids, and its streamed text is decode() of them
    without the trailing U+FFFD."""
    engine = make_engine(save_tiny(tmp_path, "llama"), tokenizer, AttentionBackendKind.TORCH)
    prompts = [list(range(p, p + 8)) for p in range(100, 4000, 97)]
    cut = next(((prompt, ids[:k]) for prompt, ids in zip(prompts, greedy_tokens(engine, prompts, 200),
                                                        strict=True)
                for k in range(1, len(ids) + 1)
                if tokenizer.decode(ids[:k]).endswith("\ufffd")), None)
    assert cut is not None, "no greedy output stops inside a character: pick other prompts"
    prompt, expected_ids = cut
    engine.add_request("cut", prompt, SamplingParams(temperature=0.0,
                                                     max_tokens=len(expected_ids),
                                                     ignore_eos=True))
    ids, text, reason = [], "", None
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.text_delta
            reason = out.finish_reason
    assert (ids, reason) == (expected_ids, FinishReason.LENGTH)
    assert text == tokenizer.decode(ids).rstrip("\ufffd")
    assert not text.endswith("\ufffd")
