"""Run the same mergekit-moe configs through ``mergekit-moe`` and ``workbench moe``; report the differences.

mergekit is never a dependency of the workbench: like ``benchmarks/mergekit_parity.py`` (whose
``ensure_mergekit`` this reuses), the script installs mergekit 0.1.5 into a throwaway virtual
environment and calls its ``mergekit-moe`` command. Both tools read the same YAML file, unchanged, on
tiny generated models: a bf16 Llama base with a word-level tokenizer (with BOS/EOS, which mergekit
needs to pad its prompt batches) and three fine-tunes, and a tiny Qwen3 family made with transformers.

What must agree: tensor names and shapes; every tensor that is copied (attention, norms, embeddings,
LM head, expert MLPs, scaled or not) bit for bit; routers within 2 bf16 steps, counted at the scale of
each router row (``row_steps``: a row is a unit vector computed from bf16 hidden states, so every entry
carries an absolute error set by the row's norm, and an entry near 0 has no finer precision than its
row; the element-wise measure of ``mergekit_parity.steps`` is reported beside it). The routers differ
slightly because mergekit averages and normalises the bf16 hidden states in bf16 while the workbench
does it in float32 (rounding once, at the end), and mergekit runs the prompts as one left-padded batch
while the workbench runs them one at a time. Random gates come from different generators and are
compared by their statistics only.

    python benchmarks/moe_parity.py [--venv DIR] [--work DIR] [--json FILE]

Exits non-zero when a copied tensor differs or a router is off by more than 2 bf16 steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_parity import bf16_ulp, ensure_mergekit, load_outputs, steps  # noqa: E402  (a sibling script, not a package)

ROUTER_STEPS = 2.0


def row_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 steps of the largest entry of each row (the last dimension)."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs().amax(dim=-1, keepdim=True), b.abs().amax(dim=-1, keepdim=True))
    return (a - b).abs() / bf16_ulp(scale)


@dataclass
class Comparison:
    case: str
    tensors: int
    copied_identical: bool  # every non-router tensor equal bit for bit
    copied_max_abs: float
    router_max_steps: float  # row_steps
    router_max_element_steps: float  # mergekit_parity.steps, element by element
    router_max_abs: float
    router_std: tuple[float, float]  # std of the router weights, mergekit / workbench (random gates)
    config_keys_only_mergekit: list[str]
    config_keys_only_workbench: list[str]
    within: bool
    seconds: tuple[float, float]


def word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)


def qwen3_family(root: Path) -> None:
    """A tiny Qwen3 base (random init, bf16) and two experts with scaled MLPs."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")
    word_tokenizer(root / "base", 256)
    for e in (1, 2):
        (root / f"ft{e}").mkdir(parents=True, exist_ok=True)
        tensors = load_file(root / "base" / "model.safetensors")
        noise = torch.Generator().manual_seed(e)
        tensors = {
            n: (t.float() * (1 + 0.3 * e) + 0.01 * torch.randn(t.shape, generator=noise)).to(torch.bfloat16)
            if ".mlp." in n
            else t
            for n, t in tensors.items()
        }
        save_file(tensors, root / f"ft{e}" / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(root / "base" / "config.json", root / f"ft{e}" / "config.json")


def cases(llama: Path, qwen3: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (mergekit-moe config, extra ``workbench moe`` options). Cases whose name says
    "informational" show a difference on purpose and are not held to the router bound."""
    base, ft1, ft2, ft3 = (str(llama / n) for n in ("base", "ft1", "ft2", "ft3"))

    def expert(model: str, words: range, **more: Any) -> dict[str, Any]:
        prompts = [" ".join(f"w{i}" for i in words[:4]), " ".join(f"w{i}" for i in words[4:7])]
        return {"source_model": model, "positive_prompts": prompts, **more}

    three = [expert(ft1, range(10, 20)), expert(ft2, range(20, 30)), expert(ft3, range(30, 40))]
    negative = [
        expert(ft1, range(10, 20), negative_prompts=["w25 w26"]),
        expert(ft2, range(20, 30), residual_scale=0.5),
        expert(ft3, range(30, 40), negative_prompts=["w11", "w12 w13 w14"]),
    ]
    same_length = [
        {"source_model": m, "positive_prompts": [f"w{s} w{s + 1} w{s + 2}", f"w{s + 3} w{s + 4} w{s + 5}"]}
        for m, s in ((ft1, 10), (ft2, 20), (ft3, 30))
    ]
    q3 = [expert(str(qwen3 / "ft1"), range(10, 20)), expert(str(qwen3 / "ft2"), range(20, 30))]
    return {
        "mixtral, hidden (default)": ({"base_model": base, "dtype": "bfloat16", "experts": three}, []),
        "mixtral, hidden, negative prompts + residual_scale": (
            {"base_model": base, "gate_mode": "hidden", "experts_per_token": 1, "experts": negative},
            [],
        ),
        "mixtral, hidden_avg, equal-length prompts": (
            {"base_model": base, "gate_mode": "hidden_avg", "experts": same_length},
            [],
        ),
        "mixtral, cheap_embed": ({"base_model": base, "gate_mode": "cheap_embed", "experts": negative}, []),
        "informational: mixtral, hidden, workbench --router-dtype float32": (
            {"base_model": base, "experts": three},
            ["--router-dtype", "float32"],
        ),
        # mergekit 0.1.5 opens loaders for the base and the routed experts only, so a shared expert must
        # be one of those models (else it fails with 'NoneType' object has no attribute 'get_tensor')
        "qwen2-moe (llama base), shared expert = base, per-expert layout": (
            {
                "base_model": base,
                "experts": three[:2],
                "shared_experts": [
                    {"source_model": base, "positive_prompts": ["w40 w41 w42"], "residual_scale": 0.1}
                ],
            },
            ["--expert-layout", "per-expert"],
        ),
        "qwen3-moe, hidden": (
            {"base_model": str(qwen3 / "base"), "experts_per_token": 1, "experts": q3},
            [],
        ),
        "mixtral, random gates": ({"base_model": base, "gate_mode": "random", "experts": three}, []),
    }


def is_router(name: str) -> bool:
    return name.endswith(("gate.weight", "shared_expert_gate.weight")) and "gate_proj" not in name


def compare(mk_dir: Path, wb_dir: Path) -> dict[str, Any]:
    mk, wb = load_outputs(mk_dir), load_outputs(wb_dir)
    if set(mk) != set(wb):
        raise SystemExit(
            f"tensor names differ: only mergekit {sorted(set(mk) - set(wb))[:5]}, "
            f"only workbench {sorted(set(wb) - set(mk))[:5]}"
        )
    copied_max, router_steps, element_steps, router_abs, identical = 0.0, 0.0, 0.0, 0.0, True
    mk_router, wb_router = [], []
    for name, a in mk.items():
        b = wb[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise SystemExit(f"{name}: {tuple(a.shape)} {a.dtype} (mergekit) vs {tuple(b.shape)} {b.dtype}")
        diff = float((a.float() - b.float()).abs().max())
        if is_router(name):
            router_steps = max(router_steps, float(row_steps(a, b).max()))
            element_steps = max(element_steps, float(steps(a, b).max()))
            router_abs = max(router_abs, diff)
            mk_router.append(a.float().reshape(-1))
            wb_router.append(b.float().reshape(-1))
        else:
            identical &= torch.equal(a, b)
            copied_max = max(copied_max, diff)
    mk_cfg = json.loads((mk_dir / "config.json").read_text())
    wb_cfg = json.loads((wb_dir / "config.json").read_text())
    return {
        "tensors": len(mk),
        "copied_identical": identical,
        "copied_max_abs": copied_max,
        "router_max_steps": router_steps,
        "router_max_element_steps": element_steps,
        "router_max_abs": router_abs,
        "router_std": (float(torch.cat(mk_router).std()), float(torch.cat(wb_router).std())),
        "config_keys_only_mergekit": sorted(set(mk_cfg) - set(wb_cfg)),
        "config_keys_only_workbench": sorted(set(wb_cfg) - set(mk_cfg)),
    }


def timed(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {status}); its output is in {log}")
    return time.perf_counter() - start


def run(venv: Path, work: Path) -> list[Comparison]:
    from workbench.checkpoint.synthetic import write_family

    mergekit_moe = ensure_mergekit(venv).with_name("mergekit-moe")
    llama, qwen3 = work / "llama", work / "qwen3"
    if not (llama / "ft3" / "config.json").is_file():
        write_family(llama, "tiny", 3)
        word_tokenizer(llama / "base", 256)
    if not (qwen3 / "ft2" / "config.json").is_file():
        qwen3_family(qwen3)
    results = []
    for index, (name, (config, options)) in enumerate(cases(llama, qwen3).items()):
        folder = work / f"moe{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        path = folder / "moe.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        mk_seconds = timed(
            [str(mergekit_moe), str(path), str(folder / "mergekit"), "--device", "cpu", "--quiet"],
            folder / "mergekit.log",
        )
        wb_seconds = timed(
            [
                sys.executable,
                "-m",
                "workbench",
                "moe",
                str(path),
                "--out",
                str(folder / "workbench"),
                *options,
            ],
            folder / "workbench.log",
        )
        figures = compare(folder / "mergekit", folder / "workbench")
        random = config.get("gate_mode") in ("random", "uniform_random")
        bounded = random or name.startswith("informational")
        within = figures["copied_identical"] and (bounded or figures["router_max_steps"] <= ROUTER_STEPS)
        results.append(Comparison(name, within=within, seconds=(mk_seconds, wb_seconds), **figures))
        routers = (
            "random (std {:.3f} vs {:.3f})".format(*figures["router_std"])
            if random
            else f"routers {figures['router_max_steps']:.2f} bf16 steps of the row (element-wise "
            f"{figures['router_max_element_steps']:.0f}, max |diff| {figures['router_max_abs']:.3g})"
        )
        copied = "copied tensors identical" if figures["copied_identical"] else "COPIED TENSORS DIFFER"
        print(f"{name:70s} {copied}; {routers}", flush=True)
    return results


def markdown(results: list[Comparison]) -> str:
    lines = [
        "| config | tensors | copied tensors | routers: max bf16 steps of the row (element-wise; max abs) | "
        "config.json keys only in "
        "mergekit / only in workbench | seconds mergekit / workbench |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        copied = "identical" if r.copied_identical else f"**differ** ({r.copied_max_abs:.3g})"
        router = (
            "random: std {:.3f} / {:.3f}".format(*r.router_std)
            if "random" in r.case
            else f"{r.router_max_steps:.2f} ({r.router_max_element_steps:.0f}; {r.router_max_abs:.3g})"
        )
        keys = f"{', '.join(r.config_keys_only_mergekit) or '-'} / {', '.join(r.config_keys_only_workbench) or '-'}"
        lines.append(
            f"| {r.case} | {r.tensors} | {copied} | {router} | {keys} | {r.seconds[0]:.1f} / {r.seconds[1]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "workbench-mergekit-venv",
        help="throwaway virtual environment for mergekit",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep models, configs and outputs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="workbench-moe-parity-") as tmp:
            results = run(args.venv, Path(tmp))
    else:
        results = run(args.venv, args.work)
    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if not all(r.within for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
