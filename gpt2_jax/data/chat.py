"""Chat rows rendered to text, and which characters of it are the assistant's to learn.

A ``messages`` row (a list of ``{role, content}``) is rendered by a Jinja template, as
Hugging Face chat templates are, in a sandbox. The template marks what is trained with
``{% generation %} ... {% endgeneration %}`` (transformers' convention for
``return_assistant_tokens_mask``); ``render`` returns the text and those character spans.
Everything outside a span is context (the turn's prompt: the system and user turns and the
``Assistant:`` header before it); each span is a completion. ``examples`` turns the spans
into target tokens: a token is a target when it overlaps a span, as transformers'
assistant mask counts them.

The default template is plain text, for a base model that has no chat format of its own::

    System: {content}\\n\\n          (any role but assistant: its name capitalised)
    User: {content}\\n\\n
    Assistant: {content}<|endoftext|>  (the span: " {content}<|endoftext|>")

The assistant's leading space is inside the span, so the first word's token (" Hello")
is wholly a target, and the ``<|endoftext|>`` that ends the turn is learned too: a
generation stops there.
"""

from __future__ import annotations

import functools
from pathlib import Path

from gpt2_jax.data.sources import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "Assistant:{% generation %} {{ message['content'] }}<|endoftext|>{% endgeneration %}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endif -%}"
    "{%- endfor -%}"
)

# Private-use characters that bracket each generation span while rendering (removed after);
# a row whose text holds one is refused (examples.check_text).
OPEN, CLOSE = "\ue000", "\ue001"


def template_source(value: str) -> str:
    """``data.chat_template``: '' -> the default; a path to an existing file -> its text;
    anything else is the template itself."""
    if not value:
        return DEFAULT_CHAT_TEMPLATE
    if "{" not in value:  # no Jinja syntax: it names a file
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template: no such file: {value!r}")
        return path.read_text(encoding="utf-8")
    return value


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """The sandboxed Jinja template of ``source``; DataError naming data.chat_template when
    it does not parse or has no ``{% generation %}`` block."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_mark")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return OPEN + caller() + CLOSE

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"data.chat_template: line {e.lineno}: {e.message}") from None
    if "generation" not in source:
        raise DataError(
            "data.chat_template has no {% generation %} ... {% endgeneration %} block: nothing "
            "in it would be trained; wrap each assistant turn's content in one"
        )
    return template


def render(template, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end) character spans of the generation blocks])."""
    marked = template.render(messages=messages)
    text, spans, start = [], [], None
    pos = 0
    for ch in marked:
        if ch == OPEN:
            start = pos
        elif ch == CLOSE:
            spans.append((start, pos))
        else:
            text.append(ch)
            pos += 1
    return "".join(text), [(a, b) for a, b in spans if b > a]
