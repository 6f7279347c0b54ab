"""Chat templates for a merged model: mergekit's named ones, a literal Jinja string, or ``auto``.

A merge of a base with an instruction-tuned model often needs the chat format of one of them (or a
standard one) in the output's tokenizer files, or ``apply_chat_template`` has nothing to apply. The
value is read as mergekit 0.1.5 reads its ``chat_template`` key:

* ``auto``: the template most of the input models carry (ties: the first in recipe order, base
  first); none carries one: the output keeps whatever its tokenizer files had;
* a short name without ``{`` or a newline: one of :data:`NAMED_TEMPLATES`;
* anything else with a ``{`` and at least 20 characters: a Jinja template, used as given.

The named templates are written here (they are standard formats, not copied files). They render
the formats as their model families define them; mergekit's files differ in whitespace in three
places (see docs/tokenizers.md): its ``llama3`` puts a newline after every ``<|eot_id|>``, its
``exaone`` lets the template's indentation into the text, and its ``alpaca`` joins the last message
and the generation prompt without a blank line.

The template is written both as ``chat_template.jinja`` (what transformers 4.43+ and 5.x read
first) and as ``chat_template`` in ``tokenizer_config.json`` (what older transformers read), so
every reader sees the same text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workbench.errors import CheckpointError

_CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta's Llama 3 instruct format: the BOS token once, a header per turn, no text between turns.
_LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{ bos_token }}{%- endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral's [INST] format; an optional system message opens the first user turn.
_MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, after an optional system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Alpaca: the (last) system message, then Instruction / Input / Response blocks a blank line apart.
_ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{%- if system %}{{ system[-1]['content'] | trim }}{{ '\\n\\n' }}{%- endif %}"
    "{%- for message in messages if message['role'] != 'system' %}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
    "{%- elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
    "{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{%- if messages | rejectattr('role', 'equalto', 'system') | list %}{{ '\\n\\n' }}{%- endif %}"
    "{{ '### Response:\\n' }}"
    "{%- endif %}"
)

# EXAONE 3: [|role|] markers, an empty system turn when none is given, [|endofturn|] after replies.
_EXAONE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{%- endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{%- if message['role'] == 'user' %}{{ '\\n' }}{%- else %}{{ '[|endofturn|]\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '[|assistant|]' }}{%- endif %}"
)

#: mergekit 0.1.5's named templates (``mergekit/_data/chat_templates/*.jinja``), by name.
NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}
AUTO = "auto"
JINJA_FILE = "chat_template.jinja"


def _looks_like_name(value: str) -> bool:
    """mergekit's test for a template name rather than a template."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> str:
    """``value`` if it is ``auto``, a known name or a plausible Jinja template; else ``ValueError``
    (for the recipe's validation, which names the field and line)."""
    if value == AUTO or value in NAMED_TEMPLATES:
        return value
    names = ", ".join([AUTO, *sorted(NAMED_TEMPLATES)])
    if _looks_like_name(value):
        raise ValueError(
            f"unknown chat template '{value}'; the named ones are {names}, or give the Jinja template itself"
        )
    if len(value) < 20 or "{" not in value:
        why = "shorter than 20 characters" if "{" in value else "no '{'"
        raise ValueError(f"{value!r} is neither a named chat template ({names}) nor a Jinja template ({why})")
    return value


def folder_chat_template(folder: Path) -> str | None:
    """The chat template a model folder carries, as transformers would load it: chat_template.jinja
    first, else ``chat_template`` in tokenizer_config.json (a list of named templates: 'default')."""
    jinja = folder / JINJA_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {e.get("name"): e.get("template") for e in template if isinstance(e, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve_chat_template(value: str, folders: list[Path]) -> str | None:
    """The template text for ``value`` (checked by :func:`check_chat_template`); ``folders`` are the
    input models' folders, in recipe order (base first), for ``auto``. None: ``auto`` found none."""
    if value == AUTO:
        found = [t.strip() for t in (folder_chat_template(f) for f in folders) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(value, value)


def write_chat_template(folder: Path, template: str) -> list[str]:
    """Put ``template`` into the tokenizer files of ``folder``; returns the names written."""
    (folder / JINJA_FILE).write_text(template, encoding="utf-8")
    written = [JINJA_FILE]
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{config} is not valid JSON ({exc}).") from None
        if isinstance(data, dict):
            data["chat_template"] = template
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(config.name)
    legacy = folder / "chat_template.json"  # a processor's copy would otherwise keep the old template
    if legacy.is_file():
        legacy.write_text(json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n")
        written.append(legacy.name)
    return written
