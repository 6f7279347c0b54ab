"""Fuzzing what files say about a model or an output: a manifest of any content never makes ``verify``
(or ``--resume``, which reads it the same way) vouch for a file outside its folder or fail with anything
but a named problem; a ``config.json`` object of any content gets a reason or passes, and passes only
when every size it gives is a positive whole number and it counts every layer the weights have.
(``make fuzz`` runs these with many more examples.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fuzz_guards import time_limit
from hypothesis import example, given, strategies as st

from workbench.architecture import LAYER_COUNT_KEYS, SIZE_KEYS, config_problem
from workbench.engine.manifest import MANIFEST_FILE, Manifest, verify_folder
from workbench.errors import OutputError

LIMIT_S = 5.0
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)

# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------

FILES = {"a.bin": b"alpha", "sub/b.bin": b"beta"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder with two files, and beside it a file a manifest might try to reach."""
    root = tmp_path_factory.mktemp("fuzz_manifest")
    (root / "secret.txt").write_bytes(b"secret")
    folder = root / "out"
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


NAMES = st.one_of(
    st.sampled_from(
        [
            *FILES,
            "../secret.txt",
            "ABSOLUTE",
            "./a.bin",
            "sub/../a.bin",
            "sub/../../secret.txt",
            "",
            ".",
            "..",
            "a.bin\0",
            "x" * 300,
            "a.bin/x",
            "..\\secret.txt",
        ]
    ),
    st.text(max_size=12),
)
SHAS = st.one_of(st.sampled_from([_sha(b"alpha"), _sha(b"beta"), _sha(b"secret")]), JSON_VALUES)
SIZES = st.one_of(st.sampled_from([5, 4, 6]), JSON_VALUES)


@st.composite
def manifest_texts(draw: st.DrawFn) -> str:
    files = draw(
        st.dictionaries(
            NAMES, st.one_of(st.fixed_dictionaries({"sha256": SHAS, "bytes": SIZES}), JSON_VALUES), max_size=4
        )
    )
    body = {
        "version": draw(st.one_of(st.just(1), JSON_VALUES)),
        "complete": draw(st.one_of(st.just(True), JSON_VALUES)),
        "identity": draw(st.one_of(st.just({}), JSON_VALUES)),
        "files": files,
    }
    text = json.dumps(body)
    return draw(st.sampled_from([text, text, text[: len(text) // 2], json.dumps(draw(JSON_VALUES))]))


@given(manifest_texts())
@example(  # a name the file system refuses (ENAMETOOLONG) made verify raise
    json.dumps(
        {
            "version": 1,
            "complete": True,
            "identity": {},
            "files": {"x" * 300: {"sha256": _sha(b"alpha"), "bytes": 5}},
        }
    )
)
def test_a_manifest_of_any_content_never_vouches_for_a_file_outside_its_folder(
    output: Path, text: str
) -> None:
    secret = (output.parent / "secret.txt").resolve()
    (output / MANIFEST_FILE).write_text(text.replace("ABSOLUTE", str(secret)))
    with time_limit(LIMIT_S):
        problems = verify_folder(output)
        assert all(isinstance(p, str) for p in problems)
        try:
            manifest = Manifest.read(output)
        except OutputError:
            assert problems, "an unreadable manifest must be reported"
            return
    # readable: every name it lists stays in the folder, and the folder's files it does not list (or
    # the link) are reported, so an empty report means the listed files are exactly the real ones
    for name in manifest.files:
        assert (output / name).resolve().is_relative_to(output.resolve()) or (output / name).is_symlink(), (
            name
        )
    if not problems:
        assert set(manifest.files) == set(FILES) | ({"link.bin"} - {"link.bin"})
        assert all(manifest.files[n].sha256 == _sha(FILES[n]) for n in FILES)


# ------------------------------------------------------------------------------------------------
# config objects
# ------------------------------------------------------------------------------------------------

LAYER_NAMES = st.lists(
    st.one_of(
        st.integers(0, 40).map(lambda i: f"model.layers.{i}.mlp.up_proj.weight"),
        st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]),
    ),
    max_size=6,
)
CONFIGS = st.dictionaries(
    st.one_of(st.sampled_from(SIZE_KEYS), st.text(max_size=6)),
    st.one_of(st.integers(-3, 50), JSON_VALUES),
    max_size=6,
)


@given(CONFIGS, LAYER_NAMES)
def test_a_config_object_of_any_content_gets_a_reason_or_describes_the_weights(
    config: dict, names: list[str]
) -> None:
    problem = config_problem(config, {name: (64, 16) for name in names})  # 16 wide
    assert problem is None or (isinstance(problem, str) and len(problem) < 400)
    sizes_ok = all(config.get(k) is None or (type(config[k]) is int and config[k] > 0) for k in SIZE_KEYS)
    count_key = next((k for k in LAYER_COUNT_KEYS if config.get(k) is not None), None)
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    counts_all = count_key is None or not layers or (sizes_ok and config[count_key] > max(layers))
    width_ok = "model.embed_tokens.weight" not in names or config.get("hidden_size") in (None, 16)
    assert (problem is None) == (sizes_ok and counts_all and width_ok), (config, names, problem)
