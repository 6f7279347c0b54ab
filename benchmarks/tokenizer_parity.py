"""Tokenizer merges through mergekit and through ``workbench run``: the same YAML, compared.

Tiny bf16 Llama-shaped models (``workbench.checkpoint.synthetic``) get word-level tokenizers that
share some words at other ids, miss others, and add tokens of their own (plain and special). Each
recipe (``tokenizer_source: union``, a model, ``base``; a ``tokenizer:`` block with ``tokens``
overrides and ``pad_to_multiple_of``; a named ``chat_template``) runs unchanged through mergekit's
``mergekit-yaml`` (its own throwaway virtual environment, see ``mergekit_parity.ensure_mergekit``)
and through ``python -m workbench run``. Reported per recipe:

* whether the two output vocabularies hold the same tokens, and at the same ids (mergekit orders
  the tokens a union adds by Python/Rust hash order, which changes from run to run; the workbench
  by each model's ids), so embedding and head rows are compared **by token**;
* max |difference| and max bf16 steps (``mergekit_parity.steps``) over every tensor (the
  embedding and head row by row through the token map, padding rows by index, the rest element
  by element), and the steps of the embedding and head alone;
* for a chat template: whether the texts and a rendered conversation agree.

    python benchmarks/tokenizer_parity.py [--venv DIR] [--work DIR] [--json FILE]

Exits non-zero when a tensor is off by more than two bf16 steps or the vocabularies differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from mergekit_parity import STEPS_ALLOWED, ensure_mergekit, load_outputs, steps

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def _tokenizer(folder: Path, words: list[str], added: list[str], special: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.add_tokens(added)
    fast.add_special_tokens({"additional_special_tokens": special})
    fast.save_pretrained(folder)


def make_models(root: Path) -> dict[str, Path]:
    """base, a, b: 250-300 tokens each; shared words at other ids, words only some have, added tokens."""
    from workbench.checkpoint.synthetic import LlamaShape, write_model

    words = [f"w{i}" for i in range(300)]
    shuffle = random.Random(0)
    layout = {
        "base": (words[:250], ["<base_tool>"], ["<pad>"]),
        "a": (words[:200] + shuffle.sample(words[250:], 50), ["<a_tool>"], ["<pad>", "<|im_start|>"]),
        "b": (shuffle.sample(words[50:280], 230), ["<b_tool>"], ["<pad>"]),
    }
    paths = {}
    for variant, (name, (vocab, added, special)) in enumerate(layout.items()):
        folder = root / name
        rows = len(vocab) + len(added) + len(special)
        if not (folder / "tokenizer.json").is_file():
            write_model(
                folder, LlamaShape(64, 176, 2, 4, 2, rows), dtype="bfloat16", variant=variant, delta=0.3
            )
            _tokenizer(folder, vocab, added, special)
        paths[name] = folder
    return paths


def recipes(m: dict[str, Path]) -> dict[str, dict[str, Any]]:
    a, b, base = str(m["a"]), str(m["b"]), str(m["base"])
    linear = {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    tasks = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    return {
        "linear, tokenizer_source: union": {**linear, "tokenizer_source": "union"},
        "linear, tokenizer_source: <model b>": {**linear, "tokenizer_source": b},
        "task_arithmetic, tokenizer_source: base": {**tasks, "tokenizer_source": "base"},
        "task_arithmetic, tokenizer_source: union": {**tasks, "tokenizer_source": "union"},
        "task_arithmetic, tokenizer: tokens + pad_to_multiple_of": {
            **tasks,
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "<|im_start|>": {"source": a},
                    "w0": {"source": {"kind": "zero"}, "force": True},
                    "<new>": {"source": {"kind": "model_token", "model": b, "token": "w60"}},
                },
                "pad_to_multiple_of": 64,
            },
        },
        "linear, union, chat_template: chatml": {
            **linear,
            "tokenizer_source": "union",
            "chat_template": "chatml",
        },
        "linear, union, chat_template: llama3": {
            **linear,
            "tokenizer_source": "union",
            "chat_template": "llama3",
        },
    }


def compare(mk: Path, wb: Path) -> dict[str, Any]:
    """The figures of one recipe (see the module docstring)."""
    from transformers import AutoTokenizer

    tk_mk, tk_wb = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(wb)
    v_mk, v_wb = tk_mk.get_vocab(), tk_wb.get_vocab()
    a, b = load_outputs(mk), load_outputs(wb)
    worst_diff, worst_steps, vocab_steps, shapes_equal = 0.0, 0.0, 0.0, set(a) == set(b)
    common = sorted(set(v_mk) & set(v_wb))
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if name in VOCAB_TENSORS:
            shapes_equal &= x.shape == y.shape
            rows_mk = torch.tensor([v_mk[t] for t in common])
            rows_wb = torch.tensor([v_wb[t] for t in common])
            pairs = [(x[rows_mk], y[rows_wb])]
            if x.shape[0] > len(v_mk) and x.shape == y.shape:  # padding rows, by index
                pairs.append((x[len(v_mk) :], y[len(v_wb) :]))
        else:
            shapes_equal &= x.shape == y.shape
            pairs = [(x, y)] if x.shape == y.shape else []
        for p, r in pairs:
            worst_diff = max(worst_diff, (p.float() - r.float()).abs().max().item())
            worst_steps = max(worst_steps, steps(p, r).max().item())
            if name in VOCAB_TENSORS:
                vocab_steps = max(vocab_steps, steps(p, r).max().item())
    figures: dict[str, Any] = {
        "vocabulary": len(v_wb),
        "same_tokens": set(v_mk) == set(v_wb),
        "same_ids": v_mk == v_wb,
        "tokens_at_other_ids": sum(v_mk[t] != v_wb[t] for t in common),
        "same_shapes": bool(shapes_equal),
        "max_abs_diff": worst_diff,
        "max_steps": worst_steps,
        "max_steps_embedding_and_head": vocab_steps,
    }
    if tk_mk.chat_template or tk_wb.chat_template:
        figures["same_template_text"] = tk_mk.chat_template == tk_wb.chat_template
        render = {"tokenize": False, "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}
        figures["same_rendering"] = tk_mk.apply_chat_template(CHAT, **render) == tk_wb.apply_chat_template(
            CHAT, **render
        )
    return figures


def run(venv: Path, work: Path) -> dict[str, dict[str, Any]]:
    mergekit_yaml = ensure_mergekit(venv)
    models = make_models(work / "models")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders only; mergekit asks the Hub otherwise
    results = {}
    for index, (name, recipe) in enumerate(recipes(models).items()):
        folder = work / f"case{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = folder / "mergekit.yml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        for tool, command in (
            ("mergekit", [str(mergekit_yaml), str(config), str(folder / "mergekit"), "--random-seed", "0"]),
            (
                "workbench",
                [sys.executable, "-m", "workbench", "run", str(config), "--out", str(folder / "workbench")],
            ),
        ):
            log = folder / f"{tool}.log"
            with log.open("w") as handle:
                status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
            if status:
                raise SystemExit(f"{tool} failed on '{name}' (exit {status}); its output is in {log}")
        results[name] = compare(folder / "mergekit", folder / "workbench")
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in results[name].items()
        )
        print(f"{name:58s} {shown}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "workbench-mergekit-venv")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "workbench-tokenizer-parity"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.venv, args.work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    bad = [
        name
        for name, r in results.items()
        if r["max_steps"] > STEPS_ALLOWED or not r["same_tokens"] or not r["same_shapes"]
    ]
    if bad:
        raise SystemExit(f"outside bf16 rounding or different vocabularies: {', '.join(bad)}")


if __name__ == "__main__":
    main()
