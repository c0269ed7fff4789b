"""Real conversations through a pretrained model's chat template: HH-RLHF text as chat messages, and the splits of
prepare_data rendered with the tokenizer's template (``roads.stages.prepare_data`` writes them; ``roads.model_defaults``
measures their lengths the same way)."""

from __future__ import annotations


def hh_messages(text: str) -> list[dict]:
    """HH-RLHF text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, as the loader renders every conversation) as chat
    messages; a trailing empty ``Assistant:`` turn (a prompt awaiting its reply) is left out."""
    import re

    roles = {"Human": "user", "Assistant": "assistant", "System": "system"}
    parts = re.split(r"\n\n(Human|Assistant|System):", text)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": roles[role], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def chat_templated(splits: dict[str, list[dict]], tokenizer) -> dict[str, list[dict]]:
    """Prompts rendered with the tokenizer's chat template (ending in its assistant header); responses are the reply's
    text alone (the trainers append the EOS, the template's end of turn for ChatML models such as SmolLM2)."""
    rendered: dict[str, str] = {}

    def prompt(text: str) -> str:
        if text not in rendered:
            rendered[text] = tokenizer.apply_chat_template(hh_messages(text), tokenize=False,
                                                           add_generation_prompt=True)
        return rendered[text]

    out = {}
    for name, rows in splits.items():
        out[name] = [{k: prompt(v) if k == "prompt" else v.strip() if k in ("chosen", "rejected", "completion")
                      else v for k, v in row.items()} for row in rows]
    return out
