"""Pure tests of stop-string handling and chat-template rendering."""

import pytest

from edge_genarm.errors import UserError
from edge_genarm.text import StopMatcher
from edge_genarm.templates import build_messages, render_chat


def feed_all(matcher, pieces):
    shown, stopped = "", False
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        shown += out
        if stopped:
            return shown, True
    return shown + matcher.flush(), False


def test_stop_string_split_across_tokens_is_cut_and_never_shown():
    m = StopMatcher(("\n\nUser:",))
    assert feed_all(m, ["Hello", " there", "\n", "\nUs", "er:", " more"]) == ("Hello there", True)


def test_text_that_only_looks_like_a_stop_start_is_released():
    m = StopMatcher(("END",))
    out1, _ = m.feed("an E")
    assert out1 == "an "          # "E" may start "END": held back
    out2, stopped = m.feed("xit")
    assert (out2, stopped) == ("Exit", False)


def test_earliest_of_several_stops_wins():
    m = StopMatcher(("bb", "a"))
    assert m.feed("xxbba") == ("xx", True)


def test_no_stops_passes_everything_through():
    m = StopMatcher(())
    assert m.feed("abc") == ("abc", False)


SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_render_chat_with_default_and_explicit_system():
    out = render_chat(SMOL_TEMPLATE, build_messages("Hi", None))
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                   "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")
    out = render_chat(SMOL_TEMPLATE, build_messages("Hi", "Be brief."))
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_template_features_hugging_face_relies_on():
    tpl = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
           "{% endif %}{{ m.content | tojson }}\n{% endfor %}")
    assert render_chat(tpl, [{"role": "user", "content": "héllo \"q\""}]) == '"héllo \\"q\\""\n'
    with pytest.raises(UserError, match="no bad roles"):
        render_chat(tpl, [{"role": "bad", "content": "x"}])
