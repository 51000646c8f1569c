"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's template language (Go's
text/template), the end-of-turn token as a stop parameter, and the run's default system prompt.

A Jinja chat template cannot be translated in general; the templates models ship mostly wrap each message in
text that depends only on its role. That text is read off renderings of probe conversations:

    <head>S<after system>U1<after user>A1<after assistant>U2<generation prompt>

``head`` (before a system message's text) and ``after system`` come from a conversation with a system
message; ``start`` (everything before the first user's text when there is no system message: a template may
write its own default system prompt there) from one without. The Ollama template writes those pieces around
each message. Before a Modelfile is written its rendering is compared with the Jinja template's on a set of
conversations (system prompt or not, one to three turns); a template that is not of this kind is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import chat
from ..errors import TunelabError

_S, _U1, _A1, _U2 = "SYSTEMTEXT", "USERTEXTONE", "ASSISTANTTEXTONE", "USERTEXTTWO"


@dataclass(frozen=True)
class Wrappers:
    """The text a template writes around each message, by role."""

    head: str  # before a system message's text
    after_system: str  # after it, up to the first user's text
    start: str  # before the first user's text, without a system message
    after_user: str  # after a user's text, up to the next assistant's (an assistant turn follows)
    after_assistant: str  # after an assistant's text, up to the next user's
    generation_prompt: str  # after the last user's text when the model is to answer


def _between(text: str, a: str, b: str | None) -> str:
    i = text.index(a) + len(a)
    return text[i:] if b is None else text[i:text.index(b, i)]


def wrappers(tmpl, tok) -> Wrappers:
    """Read the role wrappers off renderings of probe conversations (see the module's docstring)."""
    s = {"role": "system", "content": _S}
    u1, a1, u2 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                  {"role": "user", "content": _U2})
    with_system = chat.render(tmpl, [s, u1, a1, u2], True, tok, "chat.template")
    without = chat.render(tmpl, [u1, a1, u2], True, tok, "chat.template")
    try:
        return Wrappers(head=with_system[:with_system.index(_S)], after_system=_between(with_system, _S, _U1),
                        start=without[:without.index(_U1)], after_user=_between(without, _U1, _A1),
                        after_assistant=_between(without, _A1, _U2), generation_prompt=_between(without, _U2, None))
    except ValueError:  # a message's text is not where a role-wrapped template writes it
        raise _not_wrapped(tmpl) from None


def go_template(w: Wrappers) -> str:
    """The Ollama TEMPLATE: each message's text between its role's wrappers (on one line: Go's whitespace
    trimming would eat the wrappers' own newlines)."""
    for piece in (w.head, w.after_system, w.start, w.after_user, w.after_assistant, w.generation_prompt):
        if "{{" in piece or "}}" in piece:
            raise TunelabError("the chat template writes '{{' or '}}' around messages, which Ollama's template "
                               "language cannot hold as text", "chat.template")
    return ("{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{{{{ if eq $m.Role \"system\" }}}}{w.head}{{{{ $m.Content }}}}{w.after_system}"
            f"{{{{ else if eq $m.Role \"user\" }}}}{{{{ if eq $i 0 }}}}{w.start}{{{{ end }}}}{{{{ $m.Content }}}}"
            f"{{{{ if $last }}}}{w.generation_prompt}{{{{ else }}}}{w.after_user}{{{{ end }}}}"
            f"{{{{ else if eq $m.Role \"assistant\" }}}}{{{{ $m.Content }}}}"
            f"{{{{ if not $last }}}}{w.after_assistant}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}")


def render_wrapped(w: Wrappers, messages: list[dict]) -> str:
    """What the Ollama template renders for ``messages`` (the pieces the TEMPLATE is made of, in Python)."""
    out = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            out += [w.head, m["content"], w.after_system]
        elif m["role"] == "user":
            out += [w.start if i == 0 else "", m["content"], w.generation_prompt if last else w.after_user]
        else:
            out += [m["content"], "" if last else w.after_assistant]
    return "".join(out)


CHECKS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
    [{"role": "system", "content": "Answer in lowercase."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "i am namey"}, {"role": "user", "content": "first letter of anna?"},
     {"role": "assistant", "content": "a"}, {"role": "user", "content": "and the last?"}],
]


def check_wrappers(w: Wrappers, tmpl, tok) -> None:
    """The wrappers render every check conversation as the Jinja template does, else a one-line error."""
    for messages in CHECKS:
        want = chat.render(tmpl, messages, True, tok, "chat.template")
        if render_wrapped(w, messages) != want:
            raise _not_wrapped(tmpl)


def _not_wrapped(tmpl) -> TunelabError:
    return TunelabError(f"chat template {tmpl.name} does not wrap each message in text that depends only on its "
                        "role, so it cannot be written in Ollama's template language (use --format gguf and "
                        "llama.cpp, which reads the Jinja template)", "chat.template")


def modelfile(w: Wrappers, stops: list[str], system: str | None, gguf_name: str) -> str:
    """The Modelfile's text: FROM, TEMPLATE, PARAMETER stop, and SYSTEM (the run's default system prompt)."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(w)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        if '"""' in system:
            raise TunelabError('the system prompt holds """, which a Modelfile cannot quote', "chat.system")
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
