"""``moekit demo``: train a multi-task MoE ViT (M3ViT / Edge-MoE) and a dense ViT with the same active FLOPs on
the bundled MultiDigit set, evaluate every task, extract each single-task pathway, and write a report folder.

Runs in a few minutes on a 2-core CPU; ``--quick`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse

from ._validate import out_dir, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_dir, default="moekit-demo", help="report folder (default: ./moekit-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny data and few steps: a smoke test in seconds")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per model (default 1000; quick 8)")
    parser.add_argument("--router", default="task_experts", choices=("task_experts", "multi_gate", "task_embed"),
                        help="task routing of the MoE model (default task_experts: Edge-MoE task-level sparsity)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: the matrices are small, and extra threads only help "
                             "on an otherwise idle machine)")
    parser.add_argument("--jobs", type=positive_int, default=2,
                        help="train the MoE and the dense model in this many processes at once (default 2; 1 = "
                             "one after the other in this process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # when called in-process (tests), leave the caller's setting alone


def _run(args: argparse.Namespace) -> int:
    """The demo as a sequence of steps: data, configs, training, pathways, quality, cost, report."""
    import time
    from pathlib import Path

    import torch

    start = time.perf_counter()
    _check_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = _data(args)
    moe_cfg, dense_cfg, train_cfg = _configs(args, train)
    models, training = _train_models(args, out, moe_cfg, dense_cfg, train_cfg, train)
    moe, dense = models["MoE ViT"], models["dense ViT"]
    pathways, pathway_rows = _pathways(moe, train, test)
    quality, approx_note = _quality(moe, dense, pathways, test)
    cost = _cost(args, moe, dense, pathways, test)
    summary = _summary(args, train, test, moe_cfg, dense_cfg, train_cfg, moe, quality, cost, pathway_rows,
                       approx_note, training, start)
    _write_report(out, summary, training, pathway_rows, start)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work starts."""
    from pathlib import Path

    if args.threads < 1 or args.jobs < 1:
        raise SystemExit("moekit demo: --threads and --jobs must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"moekit demo: --steps must be >= 1, got {args.steps}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"moekit demo: --out {args.out} exists and is not a directory")


def _data(args: argparse.Namespace):
    from ..data import make_multidigit

    n_train, n_test = (512, 200) if args.quick else (6000, 1000)
    train, test = make_multidigit(n_train, n_test, seed=args.seed)
    n_src_train = len(set(train.sources.flatten().tolist()))
    n_src_test = len(set(test.sources.flatten().tolist()))
    print(f"MultiDigit: {n_train} train / {n_test} test canvases of 12x20 from {n_src_train} / {n_src_test} "
          "distinct sklearn digits (no source image shared); tasks: left digit, right digit, segmentation")
    return train, test


def _configs(args: argparse.Namespace, train):
    """(MoE ViT config, dense ViT config with the same active FLOPs, training config)."""
    from ..models import TaskHead, ViTConfig
    from ..models.train import TrainConfig

    tasks = tuple(TaskHead(name=t.name, kind=t.kind, num_classes=t.num_classes) for t in train.tasks)
    router = {"type": args.router}
    if args.router == "task_experts":
        router["experts_per_task"] = 6  # windows 0-5, 3-8, 6-11: each task shares half its experts
    depth, heads = (2, 2) if args.quick else (4, 4)
    moe_cfg = ViTConfig(tasks=tasks, dim=32, depth=depth, num_heads=heads, num_experts=12, k=2, router=router)
    dense_cfg = moe_cfg.replace(moe_every=0)  # same blocks; each FFN = k experts' worth of hidden units
    steps = args.steps if args.steps is not None else (8 if args.quick else 1000)
    train_cfg = TrainConfig(steps=steps, batch_size=64, lr=4e-3, warmup_steps=min(20, max(1, steps // 10)),
                            seed=args.seed)
    return moe_cfg, dense_cfg, train_cfg


def _train_models(args, out, moe_cfg, dense_cfg, train_cfg, train):
    """Train both models (in worker processes when --jobs > 1); returns (models by name, training results)."""
    from dataclasses import asdict

    from ..models.checkpoint import load_model

    jobs = []
    for i, (name, cfg) in enumerate((("MoE ViT", moe_cfg), ("dense ViT", dense_cfg))):
        jobs.append({
            "name": name, "config": cfg.to_dict(), "train": asdict(train_cfg), "seed": args.seed,
            "data": (512, 200) if args.quick else (6000, 1000), "threads": args.threads,
            "progress": not args.no_progress, "position": i if args.jobs > 1 else None,
            "checkpoint": str(out / "checkpoints" / name.split()[0].lower()),
        })
    how = f"in parallel, {args.jobs} processes" if args.jobs > 1 else "one after the other"
    print(f"training both models for {train_cfg.steps} steps ({how})")
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(train_job, jobs))
    else:
        results = [train_job(job, train) for job in jobs]
    models, training = {}, {}
    for job, res in zip(jobs, results):
        models[job["name"]] = load_model(job["checkpoint"]).eval()
        training[job["name"]] = res
        print(f"{job['name']}: {res['steps']} steps in {res['seconds']:.1f} s ({res['cpu_seconds']:.1f} CPU s)")
    return models, training


def _pathways(moe, train, test):
    """Extract each task's single-task pathway; returns (pathways by task, one summary row per task)."""
    from ..models.extract import extract_task, pathway_agreement
    from ..models.flops import count_params

    calibration = train.images[:500]
    pathways, rows = {}, []
    total_params = count_params(moe)
    expert_params_full = sum(count_params(m.experts) for m in moe.moe_layers())
    for t in moe.config.tasks:
        p = extract_task(moe, t.name, calibration=calibration, coverage=0.99).eval()
        pathways[t.name] = p
        agree = pathway_agreement(moe, p, t.name, test.images)
        rows.append({
            "task": t.name,
            "experts_kept": [m.num_experts for m in p.moe_layers()],
            "params": count_params(p),
            "params_fraction": count_params(p) / total_params,
            "expert_params_fraction": sum(count_params(m.experts) for m in p.moe_layers()) / expert_params_full,
            "agreement": agree["prediction_agreement"],
            "max_abs_logit_diff": agree["max_abs_logit_diff"],
        })
    return pathways, rows


def _quality(moe, dense, pathways, test):
    """Test metrics of every model, and the note on Edge-MoE's approximations."""
    from ..models import with_approximations
    from ..models.evaluate import evaluate, predict

    tasks = moe.config.tasks
    approx = with_approximations(moe).eval()
    quality = {
        "MoE ViT": evaluate(moe, test),
        "dense ViT": evaluate(dense, test),
        "MoE pathways": {t.name: evaluate(pathways[t.name], test)[t.name] for t in tasks},
        "MoE + Edge approx": evaluate(approx, test),
    }
    approx_diff, approx_agree = 0.0, {}
    for t in tasks:
        exact_logits, approx_logits = predict(moe, test.images, t.name), predict(approx, test.images, t.name)
        approx_diff = max(approx_diff, float((exact_logits - approx_logits).abs().max()))
        approx_agree[t.name] = float((exact_logits.argmax(1) == approx_logits.argmax(1)).double().mean())
    note = (
        "`MoE + Edge approx` is the trained MoE model evaluated with Edge-MoE's single-pass softmax (gates and "
        "attention) and the table GELU, no retraining. Predictions identical to the exact model's: "
        + ", ".join(f"{k} {v:.4f}" for k, v in approx_agree.items())
        + f" (per image, or per pixel for segmentation); largest logit change {approx_diff:.2e} (a token whose "
        "top-2 gate scores nearly tie can switch experts when the approximations perturb its input)."
    )
    return quality, note


def _cost(args, moe, dense, pathways, test) -> list[dict]:
    """FLOPs, parameters and latency per image of each way to serve the tasks."""
    import torch

    from ..models.evaluate import latency_per_image
    from ..models.flops import count_params, vit_flops, vit_flops_all_tasks

    first = moe.config.tasks[0].name
    bench = test.images[:500]
    lat = lambda fn: latency_per_image(fn, bench, repeats=1 if args.quick else 3)
    total_params = count_params(moe)
    with torch.inference_mode():
        return [
            {"what": "MoE ViT, all tasks (one pass per task)", "flops": vit_flops_all_tasks(moe).total,
             "expert_flops": vit_flops_all_tasks(moe).experts, "params": total_params,
             "latency_s": lat(moe.forward_all)},
            {"what": "MoE ViT, all tasks, every expert active", "flops": vit_flops_all_tasks(moe, experts="all").total,
             "expert_flops": vit_flops_all_tasks(moe, experts="all").experts, "params": total_params,
             "latency_s": None},
            {"what": f"MoE ViT, one task ({first})", "flops": vit_flops(moe, first).total,
             "expert_flops": vit_flops(moe, first).experts, "params": total_params,
             "latency_s": lat(lambda x: moe(x, first))},
            {"what": f"extracted pathway ({first})", "flops": vit_flops(pathways[first]).total,
             "expert_flops": vit_flops(pathways[first]).experts, "params": count_params(pathways[first]),
             "latency_s": lat(lambda x: pathways[first](x))},
            {"what": "dense ViT, all tasks (one shared pass)", "flops": vit_flops_all_tasks(dense).total,
             "expert_flops": 0, "params": count_params(dense), "latency_s": lat(dense.forward_all)},
            {"what": f"dense ViT, one task ({first})", "flops": vit_flops(dense, first).total, "expert_flops": 0,
             "params": count_params(dense), "latency_s": lat(lambda x: dense(x, first))},
        ]


def _summary(args, train, test, moe_cfg, dense_cfg, train_cfg, moe, quality, cost, pathway_rows, approx_note,
             training, start) -> dict:
    import json
    import platform
    import time

    import torch

    from ..models.evaluate import expert_usage

    tasks = moe.config.tasks
    usage = {t.name: expert_usage(moe, test.images, t.name).tolist() for t in tasks}
    n_train, n_test = len(train.images), len(test.images)
    return {
        "description": (
            f"MultiDigit (sklearn digits, {n_train} train / {n_test} test canvases, disjoint source images). "
            f"MoE ViT: dim {moe_cfg.dim}, depth {moe_cfg.depth}, {len(moe.moe_layers())} MoE blocks of "
            f"{moe_cfg.num_experts} experts, top-{moe_cfg.k}, router {json.dumps(moe_cfg.moe_config(0)['router'])}. "
            f"Dense ViT: same blocks with a {dense_cfg.mlp_hidden}-unit FFN (= {moe_cfg.k} experts of "
            f"{moe_cfg.moe_hidden}). Both trained {train_cfg.steps} steps of batch 64 per task (M3ViT-style "
            "per-task backward, one AdamW step)."
        ),
        "tasks": [{"name": t.name, "kind": t.kind, "num_classes": t.num_classes} for t in tasks],
        "quality": quality,
        "cost": cost,
        "pathways": pathway_rows,
        "approx_note": approx_note,
        "training": {m: {k: v for k, v in d.items() if k != "history"} for m, d in training.items()},
        "expert_usage": usage,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                   + f", torch {torch.__version__}, {args.threads} thread(s)",
        "wall_seconds": time.perf_counter() - start,
    }


def _write_report(out, summary: dict, training: dict, pathway_rows: list, start: float) -> None:
    import json
    import time

    from ..models.report import plot_expert_usage, plot_training_curves, render_markdown, render_text

    plot_expert_usage(summary["expert_usage"], out / "expert_usage.png")
    plot_training_curves({m: d["history"] for m, d in training.items()}, out / "training_curves.png")
    summary["wall_seconds"] = time.perf_counter() - start
    summary["cpu_seconds"] = _cpu_seconds()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps({m: d["history"] for m, d in training.items()}) + "\n")
    (out / "report.md").write_text(render_markdown(summary))
    print("")
    print(render_text(summary))
    print("")
    for p in pathway_rows:
        print(f"pathway {p['task']}: experts kept per layer {p['experts_kept']}, {p['params'] / 1e3:.1f}k params "
              f"({p['params_fraction']:.0%} of the model, {p['expert_params_fraction']:.0%} of expert params), "
              f"agreement with the full model {p['agreement']:.4f}")
    print(f"report: {out / 'report.md'} (summary.json, expert_usage.png, training_curves.png); "
          f"total {summary['wall_seconds']:.1f} s wall, {summary['cpu_seconds']:.1f} s CPU")


def train_job(job: dict, data=None) -> dict:
    """Train one model of the demo and save its checkpoint; runs in a worker process when ``--jobs`` > 1."""
    import time

    import torch

    from ..data import make_multidigit
    from ..models import MultiTaskViT, ViTConfig
    from ..models.train import MultiTaskTrainer, TrainConfig

    torch.set_num_threads(job["threads"])
    if data is None:
        data, _ = make_multidigit(*job["data"], seed=job["seed"])
    torch.manual_seed(job["seed"])
    model = MultiTaskViT(ViTConfig.from_dict(job["config"]))
    trainer = MultiTaskTrainer(model, data, TrainConfig(**job["train"]), progress=job["progress"],
                               desc=f"train {job['name']}", bar_position=job["position"])
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(checkpoint_dir=job["checkpoint"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tasks = [t.name for t in model.config.tasks]
    last = trainer.history[-10:]
    return {
        "steps": trainer.step, "seconds": seconds, "cpu_seconds": cpu_seconds, "history": trainer.history,
        "final_losses": {t: sum(r[f"loss/{t}"] for r in last) / len(last) for t in tasks},
    }


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished worker processes."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        import time

        return time.process_time()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
