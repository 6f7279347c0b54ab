"""Fuzzing the recipe loader (issue 10): any recipe text, native or mergekit, ends in a ``Recipe`` or
in a ``RecipeError`` that names the file, within a time limit; YAML alias bombs, recursive aliases and
deep nesting are refused before anything walks them.

Inputs: YAML-ish token soup, valid recipes with fields replaced by wrong types and values, alias
bombs of every size, and deep nesting. A few inputs that crashed before are replayed through
``workbench validate`` to check the CLI prints one clean paragraph and exits 2.

The suite runs the hypothesis profile "suite"; ``make fuzz`` runs the same targets much longer.
"""

from __future__ import annotations

import copy
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_failures import assert_failed, invoke
from click.testing import CliRunner
from fuzz_guards import time_limit
from hypothesis import event, example, given, strategies as st

from workbench.errors import RecipeError
from workbench.recipe.schema import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_VALUES,
    Recipe,
    load_recipe,
    parse_recipe,
)

#: Wall time one example may take. Parsing is milliseconds; the worst legitimate case measured is
#: flow nesting hundreds deep, where PyYAML's scanner is quadratic until the parser's recursion
#: gives up (about 1.5 s on a loaded machine).
LIMIT_S = 10.0
NAME = "fuzzed-recipe.yaml"


def outcome(text: str, name: str = NAME) -> Recipe | RecipeError:
    """The recipe, or the ``RecipeError`` (which must name ``name``); any other exception fails."""
    try:
        with time_limit(LIMIT_S):
            recipe = parse_recipe(text, name)
    except RecipeError as exc:
        assert name in str(exc), f"the error does not name the file: {exc}"
        event("refused")
        return exc
    event("accepted")
    return recipe


def parse_or_refuse(text: str, name: str = NAME) -> Recipe | None:
    """``outcome``, with None for a refusal."""
    result = outcome(text, name)
    return result if isinstance(result, Recipe) else None


def assert_round_trips(recipe: Recipe) -> None:
    """An accepted recipe, written back as native YAML (``workbench convert``), reads back the same."""
    again = parse_or_refuse(recipe.to_yaml(), "round-trip.yaml")
    assert again is not None, recipe.to_yaml()
    assert again.model_dump() == recipe.model_dump()


# ------------------------------------------------------------------------------------------------
# token soup
# ------------------------------------------------------------------------------------------------

TOKENS = [
    "method: ",
    "merge_method: ",
    "linear",
    "slerp",
    "ties",
    "models:",
    "slices:",
    "sources:",
    "model: ",
    "base_model: ",
    "parameters: ",
    "weight: ",
    "layer_range: ",
    "output: ",
    "shard_size: ",
    "memory_limit: ",
    "dtype: ",
    "seed: ",
    "evaluators: ",
    "a",
    "./m",
    "\n",
    "\n  ",
    "\n    ",
    "- ",
    ": ",
    ", ",
    "[",
    "]",
    "{",
    "}",
    "? ",
    "'",
    '"',
    "#",
    "|\n",
    ">\n",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "&x ",
    "*x",
    "&y ",
    "*y",
    "<<: ",
    "!!str ",
    "!!int ",
    "!!float ",
    "!!omap ",
    "!!set ",
    "!!binary ",
    "!!timestamp ",
    "!!python/object/apply:os.system ",
    "!custom ",
    "1e400",
    ".inf",
    ".nan",
    "-1",
    "0x" + "f" * 40,
    "9" * 5000,
    "2001-02-30",
    "1:2:3",
    "null",
    "~",
    "true",
    "\t",
    '"\\ud800"',
    '"\\x00"',
    "\u2028",
    "\ufeff",
    "5GB",
    "9" * 400 + "GB",
]


@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3)), max_size=60).map("".join))
@example(
    "method: linear\nmodels: [a]\nseed: " + "9" * 5000
)  # ValueError: int digit limit, from the YAML constructor
@example("!!omap [{[a]: 1}]")  # TypeError: a list key hashed into the line map
@example('method: "\\ud800"\nmodels: [a]\n')  # accepted a string no console can print
@example("method: linear\nmodels: [a]\nmemory_limit: " + "9" * 400 + "GB\n")  # OverflowError: int(inf)
@example("merge_method: [a]\n")  # TypeError: unhashable method
@example("merge_method: linear\n1: a\nb: c\n")  # TypeError: sorting int and str keys
@example("merge_method: linear\nmodels: 5\n")  # TypeError: int is not iterable
@example("merge_method: linear\nmodels: [{model: a}]\nparameters: ab\n")  # ValueError from dict('ab')
@example("merge_method: linear\nmodels: [{model: a, parameters: 5}]\n")  # TypeError from dict(5)
def test_token_soup_fails_cleanly(text: str) -> None:
    """Text made of YAML syntax and recipe words parses or is refused by name, never crashes."""
    recipe = parse_or_refuse(text)
    if recipe is not None:
        assert_round_trips(recipe)


# ------------------------------------------------------------------------------------------------
# valid recipes, then wrong types and values
# ------------------------------------------------------------------------------------------------

TEMPLATES: list[dict[str, Any]] = [
    {
        "method": "linear",
        "models": ["a", {"model": "b", "parameters": {"weight": 0.5}}],
        "parameters": {},
        "dtype": "float32",
        "seed": 0,
        "memory_limit": "16GB",
        "output": {"path": "out", "shard_size": "5GB", "dtype": "bfloat16", "copy_tokenizer_from": "base"},
        "evaluators": ["zoo_copy"],
    },
    {
        "method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 4]}]},
            {"sources": [{"model": "a", "layer_range": [2, 6]}]},
        ],
    },
    {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}}, {"model": "base"}],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    },
    {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.5},
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}
        ],
    },
]

WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**100, -(10**30), 2**63, 2**64]),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(
        [
            "",
            " ",
            "9" * 400 + "GB",
            "1e400",
            "-5GB",
            "0",
            "float8",
            "I8",
            "../../x",
            "org/name@rev",
            "linear",
            "ties",
            "slerp",
            "union",
            "base",
            "\u0000",
        ]
    ),
    st.lists(st.integers(-2, 8), max_size=3),
    st.dictionaries(
        st.sampled_from(["model", "weight", "t", "sources", "x"]), st.integers(-1, 3), max_size=2
    ),
)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested dict/list where a value sits."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths_of(item, prefix + (i,))
    return out


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A template recipe with 0..3 edits (replace, delete, add a field); True when left unedited."""
    data = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    edits = draw(st.integers(0, 3))
    for _ in range(edits):
        path = draw(st.sampled_from(paths_of(data)))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(WEIRD)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[
                draw(st.sampled_from(["extra", "slices", "models", "base", "modules", "name", 1, None]))
            ] = draw(WEIRD)
        else:
            parent.append(draw(WEIRD))
        if not paths_of(data):
            break
    return data, edits == 0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_recipe")


SLERP_SOURCES = [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]


@given(near_valid())
# TypeError: sorting a slice's unknown keys, a number among them (found by the fuzz profile)
@example(
    (
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [{"sources": SLERP_SOURCES, "extra": None, 1: None}],
        },
        False,
    )
)
@example(
    (
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [{"sources": [{**SLERP_SOURCES[0], "extra": None, 1: None}, SLERP_SOURCES[1]]}],
        },
        False,
    )
)
def test_near_valid_recipes_load_or_fail_cleanly(scratch: Path, case: tuple[dict[str, Any], bool]) -> None:
    """Through ``load_recipe`` (the file path the CLI takes): a valid recipe with wrong types, huge
    or non-finite numbers, unknown and missing fields loads or is refused naming the file; the
    unedited templates always load, and whatever loads round-trips."""
    data, untouched = case
    path = scratch / f"{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        with time_limit(LIMIT_S):
            recipe = load_recipe(path)
    except RecipeError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        assert not untouched, f"a valid template was refused: {exc}"
        return
    finally:
        path.unlink()
    if not any(isinstance(v, float) and not math.isfinite(v) for v in leaves(data)):
        assert_round_trips(recipe)  # JSON dumps infinities as null: not a round trip to hold


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


# ------------------------------------------------------------------------------------------------
# alias bombs, recursive aliases, deep nesting
# ------------------------------------------------------------------------------------------------


def alias_bomb(levels: int, fanout: int, field: str = "parameters") -> str:
    """``levels`` anchors, each a list of ``fanout`` aliases of the one before: fanout**levels values
    once expanded, in a few hundred bytes of text."""
    lines = ["method: linear", "models: [a]", f"{field}:", f"  l0: &l0 [{', '.join(['x'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


def expanded_values(levels: int, fanout: int) -> int:
    """Values (nodes) the bomb's YAML expands to: the mapping, its keys, and every level in full."""
    per_level = [fanout + 1]  # the innermost list and its scalars
    for _ in range(1, levels):
        per_level.append(1 + fanout * per_level[-1])
    return 1 + 2 * 3 + 1 + levels + sum(per_level)  # top map, 3 keys+values, 'parameters' map, keys


@given(
    st.integers(1, 12), st.integers(1, 12), st.sampled_from(["parameters", "models", "output", "evaluators"])
)
@example(9, 9, "parameters")  # billion laughs: hung in the line map (exponential walk), then in validation
def test_alias_bombs_are_refused_quickly(levels: int, fanout: int, field: str) -> None:
    """Any bomb is refused or parsed within the time limit; one whose expansion passes the cap is
    refused with the reason, however few bytes its text has."""
    result = outcome(alias_bomb(levels, fanout, field))
    if fanout**levels > MAX_RECIPE_VALUES:
        assert isinstance(result, RecipeError) and "expands to more than" in str(result), result
    if expanded_values(levels, fanout) < MAX_RECIPE_VALUES // 2 and field == "parameters":
        assert isinstance(result, Recipe), f"a small use of aliases was refused: {result}"


@pytest.mark.parametrize(
    "text",
    [
        "method: linear\nmodels: [a]\nparameters: &p {x: *p}\n",
        "method: linear\nmodels: &m [a, *m]\n",
        "&top {method: linear, models: [a], parameters: {again: *top}}\n",
    ],
)
def test_recursive_aliases_are_refused(text: str) -> None:
    """An alias inside its own anchor made a cyclic structure: RecursionError in the line map."""
    with time_limit(LIMIT_S), pytest.raises(RecipeError, match=f"{NAME}:.*recursive"):
        parse_recipe(text, NAME)


@given(
    st.integers(1, 2 * MAX_RECIPE_DEPTH),
    st.sampled_from(["flow_list", "flow_map", "block_map", "block_list"]),
)
@example(1000, "flow_list")  # RecursionError from PyYAML's composer
@example(100_000, "flow_map")
@example(400, "block_map")
@example(MAX_RECIPE_DEPTH + 1, "flow_list")  # just past the limit: refused by the depth check itself
def test_deep_nesting_is_refused_by_depth(depth: int, style: str) -> None:
    """Nesting up to the limit parses (as a parameter value); deeper is refused with the reason."""
    if style == "flow_list":
        value = "[" * depth + "]" * depth
    elif style == "flow_map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "block_map":
        value = "".join(f"\n{'  ' * (i + 2)}k:" for i in range(depth)) + " 1"
    else:
        value = "".join(f"\n{'  ' * (i + 2)}-" for i in range(depth)) + " 1"
    text = f"method: linear\nmodels: [a]\nparameters:\n  deep: {value}\n"
    result = outcome(text)
    # 'deep' sits two levels below the document's top mapping; its innermost level holds a scalar,
    # except for the empty innermost flow list
    deepest = 2 + depth - (1 if style == "flow_list" else 0)
    if deepest > MAX_RECIPE_DEPTH:
        assert isinstance(result, RecipeError) and "nested more than" in str(result), result
    else:
        assert isinstance(result, Recipe), result


def test_an_oversized_recipe_file_is_not_read_whole(tmp_path: Path) -> None:
    """A recipe file past the size cap is refused by size (a stray multi-gigabyte file, or
    /dev/zero, must not be read into memory)."""
    path = tmp_path / "huge.yaml"
    path.write_text("method: linear\nmodels: [a]\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    with pytest.raises(RecipeError, match="larger than") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)
    with time_limit(LIMIT_S), pytest.raises(RecipeError, match="larger than"):
        load_recipe("/dev/zero")


# ------------------------------------------------------------------------------------------------
# the CLI on inputs that crashed before
# ------------------------------------------------------------------------------------------------

FOUND = {
    "billion_laughs": alias_bomb(9, 9),
    "recursive_alias": "method: linear\nmodels: [a]\nparameters: &p {x: *p}\n",
    "deep_nesting": "method: linear\nmodels: [a]\nparameters: " + "[" * 1000 + "]" * 1000 + "\n",
    "huge_integer": "method: linear\nmodels: [a]\nseed: " + "9" * 5000 + "\n",
    "huge_size": "method: linear\nmodels: [a]\nmemory_limit: " + "9" * 400 + "GB\n",
    "lone_surrogate": 'method: "\\ud800"\nmodels: [a]\n',
    "omap_list_key": "!!omap [{[a]: 1}]\n",
    "mergekit_list_method": "merge_method: [a]\nmodels: [{model: a}]\n",
    "mergekit_mixed_keys": "merge_method: linear\n1: a\nb: c\n",
    "mergekit_models_int": "merge_method: linear\nmodels: 5\n",
    "mergekit_parameters_str": "merge_method: linear\nmodels: [{model: a}]\nparameters: ab\n",
    "mergekit_slice_mixed_keys": (
        "merge_method: slerp\nbase_model: a\nslices:\n"
        "  - sources: [{model: a, layer_range: [0, 4]}]\n    extra: 1\n    1: 2\n"
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_validate_reports_found_inputs_cleanly(cli: CliRunner, tmp_path: Path, name: str) -> None:
    """``workbench validate`` on each input the fuzzing found: exit 2, one 'error:' paragraph naming
    the file, no traceback."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(FOUND[name])
    with time_limit(LIMIT_S):
        result = invoke(cli, "validate", recipe, None)
    assert_failed(result, None, str(recipe))
