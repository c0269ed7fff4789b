"""The real 135M model (``roads model fetch smollm2-135m``; CI fetches it): its pad is its EOS, and a chat-templated
greedy answer ends on that EOS and is ``finished``."""

from __future__ import annotations

import pytest

from roads.fetch import fetched_path, model_cache

FOLDER = fetched_path("smollm2-135m")
pytestmark = pytest.mark.skipif(FOLDER is None, reason=f"SmolLM2-135M not fetched into {model_cache()}: run "
                                                       "`roads model fetch smollm2-135m` (make model)")


def test_smollm2_answer_keeps_its_eos():
    from roads.generation import sample
    from roads.models import load_pretrained

    model, tok = load_pretrained(str(FOLDER))
    assert tok.pad_token_id == tok.eos_token_id and tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)
    c = sample(model, tok, [prompt], n=1, max_new_tokens=40, temperature=0.0, seed=0)[0][0]
    assert "Paris" in c.text
    assert c.finished and c.ids[-1] == tok.eos_token_id
