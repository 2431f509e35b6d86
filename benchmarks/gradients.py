"""Cost and bias of each gradient policy: ``python benchmarks/gradients.py [--quick]``.

For each zoo generator (digits-unet, digits-dit), N in {10, 25, 50} and each policy, one gradient of a
reward (log p(3 | image) under digits-classifier) with respect to the initial noise at batch 8: seconds
per gradient (forward and backward, median of repeats), peak resident memory of the process above its
baseline after loading and a no-grad warm-up, the bytes the autograd graph saved, and the cosine
similarity of the latent gradient with Full's (the shortcut's bias). Each configuration runs in its own
process so that peak memory is its own; a plain no-grad rollout of the same N is the floor. Ratios
against Full and against the no-grad rollout are computed from the same run.

Writes benchmarks/results/gradients.json and benchmarks/results/gradients.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, emit, peak_rss_mb, run_child, write_results  # noqa: E402

# Truncated(k) and RandomTruncated detach the latent before their last k steps, so by construction they give
# the initial noise no gradient at all; they are measured where they apply, on weights (benchmarks/sdo_finetune.py).
POLICIES = ["nograd", "full", "checkpointed", "shortcut", "straight_through"]


def policy_of(name: str):
    from diffusion_shortcuts import gradients as G

    return {"nograd": None, "full": G.Full(), "checkpointed": G.Checkpointed(), "shortcut": G.Shortcut(),
            "straight_through": G.StraightThrough()}[name]


def run_one(model_name: str, steps: int, policy_name: str, batch: int, repeats: int, grad_out: str) -> dict:
    """Measure one configuration in this process (called in a child process)."""
    import torch

    import diffusion_shortcuts as ds

    torch.manual_seed(0)
    m = ds.zoo.load(model_name)
    clf = ds.zoo.load("digits-classifier")
    sampler = m.sampler(num_inference_steps=steps)
    noise = m.noise(batch, torch.Generator().manual_seed(0))
    cond = m.encode(torch.arange(batch) % 10).detach()
    target = torch.full((batch,), 3)
    policy = policy_of(policy_name)
    with torch.no_grad():  # warm-up at the same size; the baseline includes it
        sampler(noise, cond)
    baseline = peak_rss_mb()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times, grad = [], None
    for r in range(repeats):
        x = noise.clone().requires_grad_(policy is not None)
        saved[0] = 0
        start = time.perf_counter()
        if policy is None:
            with torch.no_grad():
                clf.log_prob(sampler(x, cond), target).sum()
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                images = sampler(x, cond, gradient=policy, generator=torch.Generator().manual_seed(r))
            clf.log_prob(images, target).sum().backward()
            grad = x.grad
        times.append(time.perf_counter() - start)
    if grad is not None:
        torch.save(grad, grad_out)
    times.sort()
    return {"model": model_name, "steps": steps, "policy": policy_name, "batch": batch,
            "seconds": times[len(times) // 2], "seconds_all": times,
            "peak_mb_above_baseline": max(0.0, peak_rss_mb() - baseline), "baseline_mb": baseline,
            "graph_saved_mb": saved[0] / 2**20}


def child_main(args) -> None:
    emit(run_one(args.model, args.steps, args.policy, args.batch, args.repeats, args.grad_out))


def cosine(a, b) -> float:
    import torch

    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: f"C{i}" for i, name in enumerate(POLICIES)}  # one colour per policy in every panel
    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for name in POLICIES:
            rows = sorted((r for r in results if r["model"] == model and r["policy"] == name), key=lambda r: r["steps"])
            if not rows:
                continue
            ns = [r["steps"] for r in rows]
            style = dict(marker="o", label=name, color=colors[name])
            axes[row, 0].plot(ns, [r["seconds"] for r in rows], **style)
            axes[row, 1].plot(ns, [r["peak_mb_above_baseline"] for r in rows], **style)
            if name not in ("nograd", "full"):
                axes[row, 2].plot(ns, [r.get("cosine_vs_full", float("nan")) for r in rows], **style)
        axes[row, 0].set(title=f"{model}: seconds per gradient", xlabel="steps N")
        axes[row, 1].set(title=f"{model}: peak MB above baseline", xlabel="steps N")
        axes[row, 2].set(title=f"{model}: cosine of latent gradient with Full", xlabel="steps N", ylim=(-0.1, 1.05))
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
        axes[row, 2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50])
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "gradients.json")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.steps = args.steps[0]
        return child_main(args)
    if args.replot:
        import json

        return plot(json.loads(args.out.read_text())["results"], args.out.with_suffix(".png"))

    import torch
    from tqdm.auto import tqdm

    configs = [(m, n, p) for m in args.models for n in args.steps for p in args.policies]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, n, policy in tqdm(configs, desc="configurations"):
            grad_path = os.path.join(tmp, f"{Path(model).name}-{n}-{policy}.pt")
            result = run_child(__file__, ["--model", model, "--steps", str(n), "--policy", policy, "--batch",
                                          str(args.batch), "--repeats", str(args.repeats), "--grad-out", grad_path])
            result["grad_path"] = grad_path if os.path.exists(grad_path) else None
            results.append(result)
        for r in results:
            same = {x["policy"]: x for x in results if x["model"] == r["model"] and x["steps"] == r["steps"]}
            full, floor = same.get("full"), same.get("nograd")
            if full:
                r["time_vs_full"] = r["seconds"] / full["seconds"]
                r["memory_vs_full"] = (r["peak_mb_above_baseline"] / full["peak_mb_above_baseline"]
                                       if full["peak_mb_above_baseline"] > 0 else None)
                r["graph_vs_full"] = r["graph_saved_mb"] / full["graph_saved_mb"] if full["graph_saved_mb"] else None
                if r["grad_path"] and full["grad_path"]:
                    r["cosine_vs_full"] = cosine(torch.load(r["grad_path"]), torch.load(full["grad_path"]))
            if floor:
                r["time_vs_nograd"] = r["seconds"] / floor["seconds"]
        for r in results:
            r.pop("grad_path")
    write_results(args.out, "gradients", {
        "batch": args.batch, "repeats": args.repeats,
        "reward": "digits-classifier log p(3 | image), gradient w.r.t. the initial noise", "results": results})
    plot(results, args.out.with_suffix(".png"))
    for r in results:
        print(f"{r['model']:12s} N={r['steps']:3d} {r['policy']:18s} {r['seconds']:7.2f}s "
              f"x{r.get('time_vs_nograd', float('nan')):5.2f} nograd  "
              f"x{r.get('time_vs_full', float('nan')):5.2f} full  "
              f"mem {r['peak_mb_above_baseline']:7.1f}MB graph {r['graph_saved_mb']:7.1f}MB "
              f"cos {r.get('cosine_vs_full', float('nan')):.3f}")


if __name__ == "__main__":
    main()
