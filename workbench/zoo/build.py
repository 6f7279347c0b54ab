"""``workbench zoo build``: train the whole zoo here, deterministically, on CPU.

The build is a set of independent training jobs run in worker processes (one thread each, so the
result does not depend on scheduling): first the base model (pretrained) and the two from-scratch
models for optimal-transport fusion, then everything fine-tuned from the base. Each job saves its
model and scores it on every task; the scores go into ``zoo.json``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from workbench.errors import OutputError, WorkbenchError
from workbench.zoo.model import SCALES, Scale
from workbench.zoo.tasks import EXPERT_TASKS, LORA_TASKS, OT_TASK, TASKS, VOCAB_SIZE

MANIFEST = "zoo.json"
#: Pretraining: generic text in both languages (A more than B, as for a lower-resource language) and
#: translation both ways, the parallel signal that lets the middle layers be shared by the languages.
PRETRAIN_MIX = (
    ("text_a", 0.25),
    ("text_b", 0.1),
    ("text_mixed", 0.15),
    ("translate", 0.25),
    ("translate_b2a", 0.25),
)
#: Every ``REPLAY_EVERY``-th step of a full fine-tune replays pretraining data, so experts stay general
#: language models (as real fine-tunes do) and their task vectors stay moderate.
REPLAY_MIX = PRETRAIN_MIX
REPLAY_EVERY = 4
LORA_ALPHA = 16


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode()) % 100_000


def plan(scale: Scale, seed: int) -> list[dict[str, Any]]:
    """Every training job of the build, in dependency order (``base`` first)."""
    jobs: list[dict[str, Any]] = [
        {
            "name": "base",
            "kind": "pretrain",
            "init_seed": seed,
            "mix": list(PRETRAIN_MIX),
            "steps": scale.pretrain_steps,
            "lr": scale.pretrain_lr,
            "description": "pretrained on generic text in languages A and B and on A<->B translation",
        },
    ]
    for name, offset in (("ot_a", 1), ("ot_b", 2)):
        jobs.append(
            {
                "name": name,
                "kind": "scratch",
                "init_seed": seed + 1000 * offset,
                "mix": [(OT_TASK, 1.0)],
                "steps": scale.ot_steps,
                "lr": scale.pretrain_lr,
                "description": f"trained from its own random initialisation on '{OT_TASK}' only",
            }
        )
    for task in EXPERT_TASKS:
        jobs.append(
            {
                "name": f"experts/{task}",
                "kind": "finetune",
                "mix": [(task, 1.0)],
                "replay": True,
                "steps": scale.expert_steps,
                "lr": scale.expert_lr,
                "task": task,
                "description": f"base fine-tuned on '{task}' (with pretraining replay)",
            }
        )
    jobs.append(
        {
            "name": "math",
            "kind": "finetune",
            "mix": [("math", 1.0)],
            "replay": True,
            "steps": scale.math_steps,
            "lr": scale.expert_lr,
            "task": "math",
            "description": "math expert: base fine-tuned on arithmetic posed in language A",
        }
    )
    jobs.append(
        {
            "name": "language",
            "kind": "finetune",
            "mix": [("text_b", 1.0)],
            "steps": scale.language_steps,
            "lr": scale.language_lr,
            "task": "text_b",
            "description": "language expert: base fine-tuned on generic text in language B",
        }
    )
    for task in LORA_TASKS:
        jobs.append(
            {
                "name": f"lora/{task}",
                "kind": "lora",
                "mix": [(task, 1.0)],
                "replay": True,
                "steps": scale.lora_steps,
                "lr": scale.lora_lr,
                "task": task,
                "r": scale.lora_rank,
                "alpha": LORA_ALPHA,
                "description": f"LoRA adapter on the frozen base for '{task}'",
            }
        )
    for job in jobs:
        job["data_seed"] = _seed(seed, job["name"])
    return jobs


def run_job(job: dict[str, Any], directory: str, scale_name: str) -> dict[str, Any]:
    """Train, save and score one model (runs in a worker process)."""
    import torch
    from transformers.utils import logging as hf_logging

    from workbench.modeling.training import train as train_module
    from workbench.zoo import lora, model as zoo_model, tasks, train

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scale = SCALES[scale_name]
        root = Path(directory)
        lines: list[str] = []
        started = time.perf_counter()
        if job["kind"] in ("pretrain", "scratch"):
            module = zoo_model.new_model(scale, job["init_seed"])
        else:
            module = zoo_model.load(root / "base")
        wrapped = lora.attach(module, job["r"], job["alpha"]) if job["kind"] == "lora" else None
        batches = train.mixture(
            job["mix"], scale.batch_size, job["data_seed"], train_prompt=job["kind"] == "pretrain"
        )
        if job.get("replay"):
            replay = train.mixture(REPLAY_MIX, scale.batch_size, job["data_seed"] + 1)
            batches = train.interleave(batches, replay, REPLAY_EVERY)
        parameters = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)] if wrapped else None
        losses = train_module(
            module,
            batches,
            job["steps"],
            job["lr"],
            seed=job["data_seed"],
            parameters=parameters,
            weight_decay=0.1 if job["kind"] == "pretrain" else 0.01,
            log=lines.append,
            label=job["name"],
        )
        out = root / job["name"]
        if wrapped is not None:
            lora.save_adapter(
                wrapped, out, r=job["r"], alpha=job["alpha"], base_model=str((root / "base").resolve())
            )
            lora.detach(module, wrapped)
            lora.merge_adapter(module, out)  # score exactly what was written
        else:
            zoo_model.save(module, out)
        trained = time.perf_counter() - started
        scores = {name: tasks.score(module, name, scale.eval_examples, seed=0) for name in TASKS}
        return {
            "name": job["name"],
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "train_seconds": round(trained, 1),
            "accuracy": {name: round(s["accuracy"], 4) for name, s in scores.items()},
            "loss": {name: round(s["loss"], 4) for name, s in scores.items()},
            "log": lines,
        }
    finally:
        torch.set_num_threads(threads)


def _describe(job: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {key: job[key] for key in ("kind", "description", "steps", "lr") if key in job}
    entry["path"] = job["name"]
    entry["trained_on"] = {task: weight for task, weight in job["mix"]}
    if job.get("replay"):
        entry["replay"] = {"every": REPLAY_EVERY, "mix": dict(REPLAY_MIX)}
    if "init_seed" in job:
        entry["init_seed"] = job["init_seed"]
    if job["kind"] == "lora":
        entry.update(base="base", r=job["r"], lora_alpha=job["alpha"])
    elif job["kind"] in ("finetune",):
        entry["base"] = "base"
    entry.update({key: result[key] for key in ("train_seconds", "final_loss", "accuracy", "loss")})
    return entry


def build_zoo(
    directory: Path,
    scale: str = "tiny",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Train and write the zoo into ``directory`` (new or empty); returns the manifest.

    ``workers`` worker processes train in parallel (default: up to 2, one per CPU core); ``0`` runs
    every job in this process. The models do not depend on it.
    """
    if scale not in SCALES:
        raise WorkbenchError(f"unknown zoo scale {scale!r}; choose one of: {', '.join(SCALES)}.")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OutputError(
            f"{directory} already exists and is not an empty folder; build the zoo into a new or empty folder."
        )
    directory.mkdir(parents=True, exist_ok=True)
    say = log or (lambda message: None)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    jobs = plan(SCALES[scale], seed)
    started = time.perf_counter()
    say(f"building the {scale} zoo in {directory} ({len(jobs)} models, {max(workers, 1)} worker(s))")
    results: dict[str, dict[str, Any]] = {}

    def finish(result: dict[str, Any]) -> None:
        results[result["name"]] = result
        for line in result["log"]:
            say(f"  {line}")
        job = next(j for j in jobs if j["name"] == result["name"])
        own = job.get("task", OT_TASK if job["kind"] == "scratch" else "text_a")
        say(
            f"{result['name']}: {own} accuracy {result['accuracy'][own]:.3f} ({time.perf_counter() - started:.0f} s)"
        )

    if workers <= 0:
        for job in jobs:
            finish(run_job(job, str(directory), scale))
    else:
        import multiprocessing

        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:

            def submit(job: dict[str, Any]) -> Future[dict[str, Any]]:
                return pool.submit(run_job, job, str(directory), scale)

            try:
                # The base and the from-scratch models first; everything else needs the base.
                base, *pending = [submit(job) for job in jobs if job["kind"] in ("pretrain", "scratch")]
                finish(base.result())
                rest = sorted(
                    (job for job in jobs if job["kind"] not in ("pretrain", "scratch")),
                    key=lambda job: -job["steps"],
                )
                pending += [submit(job) for job in rest]  # longest first, for an even load
                for future in pending:
                    finish(future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    manifest = _manifest(directory, scale, seed, jobs, results, time.perf_counter() - started)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"zoo written to {directory} in {manifest['build_seconds']:.0f} s")
    return manifest


def _manifest(
    directory: Path,
    scale: str,
    seed: int,
    jobs: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    shape = SCALES[scale]
    models = {job["name"]: _describe(job, results[job["name"]]) for job in jobs}
    return {
        "format": 1,
        "scale": scale,
        "seed": seed,
        "command": f"workbench zoo build {directory} --scale {scale} --seed {seed}",
        "architecture": "LlamaForCausalLM",
        "vocab_size": VOCAB_SIZE,
        "shape": {
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads,
        },
        "tasks": {
            name: {
                "summary": task.summary,
                "language": task.language,
                "metric": "exact_match" if task.exact else "token_accuracy",
                "evaluator": f"zoo_{name}",
            }
            for name, task in TASKS.items()
        },
        "base": "base",
        "experts": {task: f"experts/{task}" for task in EXPERT_TASKS},
        "math": "math",
        "language": "language",
        "ot": {"task": OT_TASK, "models": ["ot_a", "ot_b"]},
        "lora": {task: f"lora/{task}" for task in LORA_TASKS},
        "eval_examples": shape.eval_examples,
        "models": models,
        "build_seconds": round(seconds, 1),
    }
