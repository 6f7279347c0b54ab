"""Tokenizers in a merge: embedding and LM-head rows aligned by token (mergekit's semantics), the
output's tokenizer (a model's, the base's, the union), ``tokens:`` overrides, padding, chat templates.

Every expected embedding and head matrix is built here by hand, token by token, from the input files
(numpy), with the rules of mergekit 0.1.5's ``PermutedVocabulary``: a token a model has keeps its
row; one it lacks takes the only donor's row, else the base's (if the base has it), else the average
of the models that have it, else zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_failures import assert_failed, invoke
from click.testing import CliRunner
from merging import load_dir, q

from workbench.checkpoint.chat_templates import NAMED_TEMPLATES
from workbench.checkpoint.synthetic import LlamaShape, write_model
from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
WORDS = [f"w{i}" for i in range(6)]


def make_model(
    folder: Path,
    words: list[str],
    added: tuple[str, ...] = (),
    special: tuple[str, ...] = (),
    variant: int = 0,
    template: str | None = None,
) -> Path:
    """A float32 Llama-shaped model with one row per token of a word-level tokenizer of ``words``
    (+ added and special tokens after them)."""
    rows = len(words) + len(added) + len(special)
    write_model(folder, LlamaShape(16, 32, 2, 2, 1, rows), dtype="float32", variant=variant, delta=0.5)
    make_tokenizer(folder, words, added, special, template)
    return folder


def make_tokenizer(
    folder: Path,
    words: list[str],
    added: tuple[str, ...] = (),
    special: tuple[str, ...] = (),
    template: str | None = None,
) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    if added:
        fast.add_tokens(list(added))
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    if template:
        fast.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def vocab_of(folder: Path) -> dict[str, int]:
    """The vocabulary as mergekit reads it: transformers' ``get_vocab()``."""
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def by_hand(
    out_vocab: dict[str, int],
    inputs: list[tuple[dict[str, int], np.ndarray]],
    base: int | None = None,
    overrides: dict[str, tuple[object, bool]] | None = None,
    rows: int | None = None,
) -> list[np.ndarray]:
    """Every input's matrix in the output vocabulary, token by token (float64).

    ``overrides``: token -> (source, force), source: None (default rules), 'zero', a model position
    (its row of the token) or (position, other token)."""
    overrides = overrides or {}
    size = max(out_vocab.values()) + 1
    width = inputs[0][1].shape[1]
    result = [np.zeros((rows or size, width)) for _ in inputs]
    for token, index in out_vocab.items():
        have = [
            m for m, (vocab, matrix) in enumerate(inputs) if token in vocab and vocab[token] < len(matrix)
        ]
        source, force = overrides.get(token, (None, False))
        if source == "zero":
            default = np.zeros(width)
        elif isinstance(source, int):
            default = inputs[source][1][inputs[source][0][token]]
        elif isinstance(source, tuple):
            default = inputs[source[0]][1][inputs[source[0]][0][source[1]]]
        elif len(have) == 1:
            default = inputs[have[0]][1][inputs[have[0]][0][token]]
        elif not have:
            default = np.zeros(width)
        elif base is not None and base in have:
            default = inputs[base][1][inputs[base][0][token]]
        else:
            default = np.mean([inputs[m][1][inputs[m][0][token]] for m in have], axis=0)
        for m, (vocab, matrix) in enumerate(inputs):
            result[m][index] = matrix[vocab[token]] if m in have and not force else default
    for m in range(len(inputs)):
        if rows and rows > size:  # padding: the mean of the model's aligned rows
            result[m][size:] = result[m][:size].mean(axis=0)
    return result


def matrices(folder: Path) -> dict[str, np.ndarray]:
    tensors = load_dir(folder)
    return {name: tensors[name].double().numpy() for name in VOCAB_TENSORS}


def assert_rows(out: Path, expected: dict[str, np.ndarray]) -> None:
    got = matrices(out)
    for name in VOCAB_TENSORS:
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, a, b: tokenizers that share w0..w5 and differ in the rest (and in ids); t: a tokenizer
    folder without weights, with a token no model has."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        # base: w0..w5, 'ba' (base and a have it), 'base_only'
        "base": make_model(root / "base", [*WORDS, "ba", "base_only"]),
        # a: w4 and w5 swapped, 'ba', 'ab', 'a_only'
        "a": make_model(root / "a", ["w0", "w1", "w2", "w3", "w5", "w4", "ba", "ab", "a_only"], variant=1),
        # b: 'ab' early, no 'ba'
        "b": make_model(root / "b", ["w0", "ab", "w1", "w2", "w3", "w4", "w5", "b_only"], variant=2),
        "t": make_tokenizer(root / "t", [*WORDS, "ba", "ab", "a_only", "ghost"]),
        "plain": make_model(root / "plain", [*WORDS, "ba", "base_only"], variant=3),
    }


def run(tmp_path: Path, text: str, name: str = "out") -> tuple[Path, list[str]]:
    out = tmp_path / name
    result = run_recipe(parse_recipe(text), out=out)
    return out, result.warnings


def inputs(zoo: dict[str, Path], *keys: str) -> list[tuple[dict[str, int], dict[str, np.ndarray]]]:
    return [(vocab_of(zoo[k]), matrices(zoo[k])) for k in keys]


def expected(
    out_vocab: dict[str, int], models: list[tuple[dict[str, int], dict[str, np.ndarray]]], **rules: object
) -> dict[str, list[np.ndarray]]:
    return {
        name: by_hand(out_vocab, [(v, m[name]) for v, m in models], **rules)  # type: ignore[arg-type]
        for name in VOCAB_TENSORS
    }


# ------------------------------------------------------------------------------------------------
# (a) the default: tokenizers differ, the recipe says nothing
# ------------------------------------------------------------------------------------------------


def test_linear_aligns_rows_by_token_to_the_copied_tokenizer(zoo: dict[str, Path], tmp_path: Path) -> None:
    out, warnings = run(
        tmp_path,
        f"method: linear\nmodels:\n  - model: {q(zoo['a'])}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {q(zoo['b'])}\n    parameters: {{weight: 0.75}}\n",
    )
    vocab = vocab_of(zoo["a"])  # the output's tokenizer: the first model's, copied
    assert vocab_of(out) == vocab
    aligned = expected(vocab, inputs(zoo, "a", "b"))
    assert_rows(out, {n: 0.25 * rows[0] + 0.75 * rows[1] for n, rows in aligned.items()})
    # 'a_only' and 'ba' exist in a only: b takes a's row, so the merged row is a's own
    a = matrices(zoo["a"])["model.embed_tokens.weight"]
    got = matrices(out)["model.embed_tokens.weight"]
    np.testing.assert_allclose(got[vocab["a_only"]], a[vocab["a_only"]], rtol=1e-6)
    # w4 sits at other ids in a and b: merged by token, not by index
    b, vb = matrices(zoo["b"])["model.embed_tokens.weight"], vocab_of(zoo["b"])
    np.testing.assert_allclose(got[vocab["w4"]], 0.25 * a[vocab["w4"]] + 0.75 * b[vb["w4"]], rtol=1e-5)
    assert sum("tokenizers differ" in w for w in warnings) == 1, warnings
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)


def test_task_arithmetic_default_rules_with_a_base(zoo: dict[str, Path], tmp_path: Path) -> None:
    """Output vocabulary t: 'ba' (base and a: b takes the base's row), 'ab' (a and b: the base takes
    their average), 'a_only' (a's row everywhere) and 'ghost' (no model: zero)."""
    out, warnings = run(
        tmp_path,
        f"method: task_arithmetic\nbase: {q(zoo['base'])}\nmodels:\n  - {q(zoo['a'])}\n  - {q(zoo['b'])}\n"
        f"parameters: {{lambda: 0.5}}\noutput: {{copy_tokenizer_from: {q(zoo['t'])}}}\n",
    )
    vocab = vocab_of(zoo["t"])
    aligned = expected(vocab, inputs(zoo, "base", "a", "b"), base=0)
    assert_rows(out, {n: r[0] + 0.5 * ((r[1] - r[0]) + (r[2] - r[0])) for n, r in aligned.items()})
    got = matrices(out)["model.embed_tokens.weight"]
    assert not got[vocab["ghost"]].any()
    base, a = (
        matrices(zoo["base"])["model.embed_tokens.weight"],
        matrices(zoo["a"])["model.embed_tokens.weight"],
    )
    vbase, va = vocab_of(zoo["base"]), vocab_of(zoo["a"])
    # 'ba': b takes the base's row, so only a's task vector counts
    np.testing.assert_allclose(
        got[vocab["ba"]], base[vbase["ba"]] + 0.5 * (a[va["ba"]] - base[vbase["ba"]]), rtol=1e-5, atol=1e-6
    )
    assert any("'ghost'" in w and "zero" in w for w in warnings), warnings


def test_same_tokenizers_change_nothing(zoo: dict[str, Path], tmp_path: Path) -> None:
    out, warnings = run(tmp_path, f"method: linear\nmodels:\n  - {q(zoo['base'])}\n  - {q(zoo['plain'])}\n")
    base, plain = matrices(zoo["base"]), matrices(zoo["plain"])
    assert_rows(out, {n: 0.5 * base[n] + 0.5 * plain[n] for n in VOCAB_TENSORS})
    assert not [w for w in warnings if "token" in w], warnings


def test_a_model_without_tokenizer_files_keeps_index_alignment(zoo: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    write_model(bare, LlamaShape(16, 32, 2, 2, 1, 8), dtype="float32", variant=4, delta=0.5)
    out, warnings = run(
        tmp_path, f"method: linear\nmodels:\n  - {q(zoo['base'])}\n  - {q(zoo['b'])}\n  - {q(bare)}\n"
    )
    vocab = vocab_of(zoo["base"])
    models = inputs(zoo, "base", "b") + [(vocab, matrices(bare))]  # taken as indexed like the first model
    aligned = expected(vocab, models)
    assert_rows(out, {n: sum(r) / 3 for n, r in aligned.items()})
    assert any("has no tokenizer files" in w and str(bare) in w for w in warnings), warnings


# ------------------------------------------------------------------------------------------------
# (b) tokenizer_source: union
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("added")
    return {
        "a": make_model(root / "a", WORDS, added=("<a1>",), special=("<s1>",)),
        "b": make_model(
            root / "b",
            ["w0", "w1", "x2", "w3", "w4", "x5"],
            added=("<b1>",),
            special=("<s1>", "<s2>"),
            variant=1,
        ),
    }


def test_union_tokenizer_embeddings_and_a_forward_pass(added: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tmp_path / "mk.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {q(added['a'])}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {q(added['b'])}\n    parameters: {{weight: 3.0}}\ndtype: float32\n"
        "tokenizer_source: union\n"
    )
    out = tmp_path / "out"
    run_recipe(recipe, out=out)
    va = vocab_of(added["a"])
    # a's tokens keep their ids; then b's vocabulary tokens a lacks (in b's order); then added tokens
    union = dict(va)
    for token in ("x2", "x5", "<b1>", "<s2>"):
        union[token] = len(union)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == union
    assert tokenizer.convert_tokens_to_ids(list(union)) == list(union.values())
    assert tokenizer("w1 x2 <b1> w5 <s2> <a1>")["input_ids"] == [
        union[t] for t in "w1 x2 <b1> w5 <s2> <a1>".split()
    ]
    assert "<s2>" in tokenizer.all_special_tokens or tokenizer.added_tokens_decoder[union["<s2>"]].special
    aligned = expected(union, inputs(added, "a", "b"))
    assert_rows(out, {n: 0.25 * r[0] + 0.75 * r[1] for n, r in aligned.items()})
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(union)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("w0 x5 <b1> <a1>")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, len(union)) and torch.isfinite(logits).all()


def test_tokenizer_source_a_model(added: dict[str, Path], tmp_path: Path) -> None:
    out, _ = run(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {q(added['a'])}\n  - model: {q(added['b'])}\n"
        f"tokenizer_source: {q(added['b'])}\n",
    )
    vocab = vocab_of(added["b"])
    assert vocab_of(out) == vocab
    aligned = expected(vocab, inputs(added, "a", "b"))
    assert_rows(out, {n: 0.5 * r[0] + 0.5 * r[1] for n, r in aligned.items()})


# ------------------------------------------------------------------------------------------------
# (c) tokens overrides, (d) padding
# ------------------------------------------------------------------------------------------------


def test_token_overrides(zoo: dict[str, Path], tmp_path: Path) -> None:
    out, _ = run(
        tmp_path,
        f"method: linear\nmodels:\n  - {q(zoo['a'])}\n  - {q(zoo['b'])}\n"
        "tokenizer:\n  source: 0\n  tokens:\n"
        "    a_only: {source: {kind: zero}}\n"  # b lacks it: zero for b, a keeps its own
        "    w1: {source: 1, force: true}\n"  # both take b's w1
        f"    ab: {{source: {q(zoo['a'])}}}\n"  # both have it, not forced: no effect
        "    fresh: {source: {kind: model_token, model: 0, token: w2}}\n"  # new: a's w2 row for both
        "    ba: {force: true}\n",  # forced without a source: the default rule (a only: a's row)
    )
    vocab = dict(vocab_of(zoo["a"]))
    vocab["fresh"] = len(vocab)
    assert vocab_of(out) == vocab
    overrides = {
        "a_only": ("zero", False),
        "w1": (1, True),
        "ab": (0, False),
        "fresh": ((0, "w2"), False),
        "ba": (None, True),
    }
    aligned = expected(vocab, inputs(zoo, "a", "b"), overrides=overrides)
    assert_rows(out, {n: 0.5 * r[0] + 0.5 * r[1] for n, r in aligned.items()})
    got, a, b = (
        matrices(out)["lm_head.weight"],
        matrices(zoo["a"])["lm_head.weight"],
        matrices(zoo["b"])["lm_head.weight"],
    )
    va, vb = vocab_of(zoo["a"]), vocab_of(zoo["b"])
    np.testing.assert_allclose(got[vocab["a_only"]], 0.5 * a[va["a_only"]], rtol=1e-5)
    np.testing.assert_allclose(got[vocab["w1"]], b[vb["w1"]], rtol=1e-5)
    np.testing.assert_allclose(got[vocab["fresh"]], a[va["w2"]], rtol=1e-5)


def test_pad_to_multiple_of(zoo: dict[str, Path], tmp_path: Path) -> None:
    out, _ = run(
        tmp_path,
        f"method: linear\nmodels:\n  - {q(zoo['a'])}\n  - {q(zoo['b'])}\ntokenizer: {{pad_to_multiple_of: 8}}\n",
    )
    vocab = vocab_of(zoo["a"])  # 9 tokens -> 16 rows
    aligned = {
        name: by_hand(vocab, [(v, m[name]) for v, m in inputs(zoo, "a", "b")], rows=16)
        for name in VOCAB_TENSORS
    }
    assert_rows(out, {n: 0.5 * r[0] + 0.5 * r[1] for n, r in aligned.items()})
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    assert vocab_of(out) == vocab


# ------------------------------------------------------------------------------------------------
# (e) chat templates
# ------------------------------------------------------------------------------------------------

LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_named_chat_template(zoo: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    recipe = tmp_path / "mk.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {q(zoo['base'])}\n  - model: {q(zoo['plain'])}\n"
        "chat_template: chatml\n"
    )
    run_recipe(recipe, out=tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    # a chat template alone changes no rows
    base, plain = matrices(zoo["base"]), matrices(zoo["plain"])
    assert_rows(tmp_path / "out", {n: 0.5 * base[n] + 0.5 * plain[n] for n in VOCAB_TENSORS})


@pytest.mark.parametrize("value", ["literal", "auto"])
def test_literal_and_auto_chat_template(zoo: dict[str, Path], tmp_path: Path, value: str) -> None:
    from transformers import AutoTokenizer

    carrier = make_model(tmp_path / "carrier", [*WORDS, "ba", "base_only"], variant=5, template=LITERAL)
    text = json.dumps(LITERAL) if value == "literal" else "auto"
    out, _ = run(
        tmp_path,
        f"method: linear\nmodels:\n  - {q(zoo['base'])}\n  - {q(carrier)}\ntokenizer:\n  chat_template: {text}\n",
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template.strip() == LITERAL.strip()
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == "[user] hi\n[assistant] hello\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].strip() == LITERAL.strip()


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_templates_render(name: str) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    chat = [{"role": "system", "content": "Be brief."}, *CHAT, {"role": "user", "content": "bye"}]
    text = env.from_string(NAMED_TEMPLATES[name]).render(
        messages=chat, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "hello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral": "<s> [INST] Be brief.\n\nhi [/INST] hello</s> [INST] bye [/INST]",
        "alpaca": "Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\nbye\n\n"
        "### Response:\n",
        "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]hi\n[|assistant|]hello[|endofturn|]\n[|user|]bye\n"
        "[|assistant|]",
    }[name] == text


# ------------------------------------------------------------------------------------------------
# (f) bad input: the field and its line, exit status 2, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            "tokenizer:\n  tokens:\n    w1: {source: 7}\n",
            (":7:", "tokenizer.tokens.w1.source", "no models[7]"),
        ),
        (
            "tokenizer:\n  tokens:\n    w1: {source: nobody}\n",
            (":7:", "tokenizer.tokens.w1.source", "'nobody'"),
        ),
        ("tokenizer:\n  tokens:\n    nothere: {source: 0}\n", (":7:", "has no token 'nothere'")),
        (
            "tokenizer:\n  chat_template: chatml2\n",
            (":6:", "tokenizer.chat_template", "unknown chat template 'chatml2'"),
        ),
        ("tokenizer:\n  source: 5\n", (":6:", "tokenizer.source", "no models[5]")),
        (
            "tokenizer:\n  source: union\noutput: {copy_tokenizer_from: 1}\n",
            (":6:", "tokenizer.source", "give one"),
        ),
    ],
)
def test_bad_native_tokenizer_sections(
    cli: CliRunner, zoo: dict[str, Path], tmp_path: Path, command: str, extra: str, fragments: tuple[str, ...]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: linear\nmodels:\n  - {q(zoo['a'])}\n  - {q(zoo['b'])}\n" + extra)
    out = tmp_path / "out"
    assert_failed(invoke(cli, command, recipe, out), out, *fragments)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            "tokenizer_source: union\ntokenizer:\n  source: base\n",
            (":7:", "tokenizer", "tokenizer_source together"),
        ),
        ("chat_template: nonesuch\n", (":6:", "tokenizer.chat_template", "unknown chat template 'nonesuch'")),
        (
            "tokenizer:\n  tokens:\n    w1:\n      source: elsewhere\n",
            (":9:", "tokenizer.tokens.w1.source", "'elsewhere'"),
        ),
        ("tokenizer_source: [1]\n", (":6:", "tokenizer_source", "expected union, base")),
        ("tokenizer:\n  sorce: union\n", (":7:", "unknown tokenizer option 'sorce'")),
    ],
)
def test_bad_mergekit_tokenizer_keys(
    cli: CliRunner, zoo: dict[str, Path], tmp_path: Path, extra: str, fragments: tuple[str, ...]
) -> None:
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {q(zoo['a'])}\n  - model: {q(zoo['b'])}\ndtype: float32\n"
        + extra
    )
    out = tmp_path / "out"
    assert_failed(invoke(cli, "run", recipe, out), out, *fragments)


# ------------------------------------------------------------------------------------------------
# the mergekit translation
# ------------------------------------------------------------------------------------------------


def test_mergekit_translation_of_tokenizer_keys() -> None:
    head = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
    recipe = parse_recipe(head + "tokenizer:\n  pad_to_multiple_of: 64\n")
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "union"  # mergekit's default
    assert recipe.tokenizer.pad_to_multiple_of == 64
    recipe = parse_recipe(head + "base_model: c\ntokenizer_source: base\nchat_template: llama3\n")
    assert recipe.tokenizer is not None
    assert recipe.tokenizer.source == "c"  # linear merges no base: its tokenizer is named by reference
    assert recipe.tokenizer.chat_template == "llama3"
    recipe = parse_recipe(head + "tokenizer:\n  source: base\n  pad_to_multiple_of: 1\n")
    assert recipe.tokenizer is not None and recipe.tokenizer.pad_to_multiple_of is None
    assert any("no effect" in note for note in recipe.translation_notes)
    recipe = parse_recipe(head + "chat_template: chatml\n")
    assert recipe.tokenizer is not None and not recipe.tokenizer.builds_vocabulary
    # the translated recipe round-trips through the native format
    again = parse_recipe(
        parse_recipe(head + "tokenizer:\n  tokens:\n    x: {source: {kind: zero}, force: true}\n").to_yaml()
    )
    assert again.tokenizer is not None and again.tokenizer.tokens["x"].force


# ------------------------------------------------------------------------------------------------
# reading aligned rows: blocks, scattered permutations
# ------------------------------------------------------------------------------------------------


def test_scattered_rows_and_row_blocks(tmp_path: Path, registry: object) -> None:
    """A model whose tokens sit scattered over a larger vocabulary (rows read run by run), and row
    blocks of aligned tensors (as the engine reads large tensors) equal to the whole tensor's rows."""
    from workbench.engine.plan import build_plan

    words = [f"v{i}" for i in range(1000)]
    order = np.random.default_rng(0).permutation(1000).tolist()
    small = make_model(tmp_path / "small", words[:100], added=("<x>",))
    large = make_model(tmp_path / "large", [words[i] for i in order], variant=1)
    text = f"method: linear\nmodels:\n  - {q(small)}\n  - {q(large)}\ntokenizer: {{pad_to_multiple_of: 16}}\n"
    out, _ = run(tmp_path, text)
    vocab = vocab_of(small)
    aligned = {
        name: by_hand(
            vocab,
            [(v, m[name]) for v, m in [(vocab, matrices(small)), (vocab_of(large), matrices(large))]],
            rows=112,
        )
        for name in VOCAB_TENSORS
    }
    assert_rows(out, {n: 0.5 * r[0] + 0.5 * r[1] for n, r in aligned.items()})
    plan = build_plan(parse_recipe(text), registry)  # type: ignore[arg-type]
    try:
        reader = plan.models[1].reader
        assert reader.info("lm_head.weight").shape == (112, 16)
        whole = reader.read("lm_head.weight")
        for block in [(0, 7), (7, 100), (100, 101), (101, 112), (95, 110)]:
            assert torch.equal(reader.read("lm_head.weight", block), whole[block[0] : block[1]]), block
    finally:
        plan.close()
