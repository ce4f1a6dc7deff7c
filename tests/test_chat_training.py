"""Edits hold when the model is asked through its chat template (tiny model, real training)."""

import copy

import pytest

from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.evaluation import chat_text, greedy_token_ids
from test_editor import CONFIG, UNRELATED, llama_for, target_argmax_hits
from test_reedit import CAPITAL, fact
from tiny_models import tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.mark.parametrize("train_chat", [True, False])
def test_chat_form_gives_the_target_only_when_trained(train_chat):
    tok = copy.deepcopy(tiny_tokenizer(False))
    tok.chat_template = TEMPLATE
    model = llama_for(tok, seed=7)
    edit = fact(CAPITAL.format("Peru"), "Tokyo", "Peru", "capital")
    config = EditorConfig(learning_rate=0.1, max_steps=120, stop_loss=5.5, train_chat=train_chat)
    LifelongEditor(model, tok, CONFIG, config, unrelated_prompts=UNRELATED).edit([edit], progress=False)
    assert target_argmax_hits(model, tok, edit)  # the raw prompt holds either way
    asked = chat_text(tok, edit.prompt)
    assert asked.endswith("<s>assistant:") and edit.prompt in asked
    answer = greedy_token_ids(model, tok, [edit.prompt], 6, chat=True)[0]
    wanted = tok(edit.target, add_special_tokens=False)["input_ids"]
    assert (answer[:len(wanted)] == wanted) == train_chat, tok.decode(answer)
