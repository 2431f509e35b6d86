"""SDO latent optimization against full backpropagation: ``python benchmarks/sdo_latent.py``.

On digits-unet and digits-dit, DDIM 50 steps, a batch of 8 samples with 8 different noise seeds (Adam
is elementwise and the loss a sum of per-sample rewards, so the 8 samples are 8 independent runs):

- task "steer": null-label samples steered to a target digit ((seed + 3) mod 10) with DigitClass;
- task "inpaint": samples whose top half must match a held-out digit (Reference with a mask).

Policies Full, Checkpointed, Shortcut (SDO) and StraightThrough (no network graph at all), each in its
own process: seconds and peak memory per iteration, reward against iteration and against seconds (mean
and spread over the 8), seconds to reach a fixed threshold, success judged by digits-classifier-eval
(never a reward), realism (FID on digits-classifier features against the held-out set; with 8 samples
per policy it is biased upward, comparable only across policies here) and drift from the Gaussian shell.
A no-grad rollout of the same sampler is timed in each process as the floor.

Writes benchmarks/results/sdo_latent.json and sdo_latent.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, emit, peak_rss_mb, run_child, write_results  # noqa: E402

POLICIES = ["full", "checkpointed", "shortcut", "straight_through"]
TASKS = ["steer", "inpaint"]
THRESHOLDS = {"steer": -0.105, "inpaint": -0.01}  # log p >= log 0.9; masked MSE <= 0.01 (in [0,1] units)


def setup_task(m, task: str, batch: int):
    import torch

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.zoo.data import load_digits

    seeds = list(range(batch))
    noise = torch.cat([m.noise(1, torch.Generator().manual_seed(s)) for s in seeds])
    cond = m.encode(torch.full((batch,), m.null_label)).detach()
    if task == "steer":
        targets = torch.tensor([(s + 3) % 10 for s in seeds])
        return noise, cond, ds.rewards.DigitClass(targets), targets
    images, labels = load_digits("heldout")
    pick = torch.tensor([s * 97 % len(labels) for s in seeds])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    return noise, cond, ds.rewards.Reference((images[pick] + 1) / 2, mask), labels[pick]


def run_one(model_name: str, task: str, policy: str, iterations: int, batch: int, lr: float, steps: int) -> dict:
    import torch

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import accuracy, features, frechet_distance
    from diffusion_shortcuts.zoo.data import load_digits

    torch.manual_seed(0)
    m = ds.zoo.load(model_name)
    sampler = m.sampler(steps, guidance_scale=1.0)  # null label in both branches: guidance changes nothing
    noise, cond, reward, labels = setup_task(m, task, batch)
    rollouts = []
    for _ in range(2):  # the first call warms up
        start = time.perf_counter()
        with torch.no_grad():
            sampler(noise, cond)
        rollouts.append(time.perf_counter() - start)
    rollout = rollouts[-1]
    baseline = peak_rss_mb()
    res = ds.optimize_latents(sampler, reward, noise, cond, iterations=iterations, lr=lr, gradient=policy,
                              progress=False)
    history = res.history
    judge, feat = ds.zoo.load("digits-classifier-eval"), ds.zoo.load("digits-classifier")
    heldout, _ = load_digits("heldout")
    per_sample = torch.tensor(history["reward_per_sample"])  # (iterations, batch)
    seconds = torch.tensor(history["seconds"]).cumsum(0)
    reached = (per_sample.mean(1) >= THRESHOLDS[task]).nonzero()
    final = res.images.clamp(0, 1)
    return {
        "model": model_name, "task": task, "policy": policy, "iterations": iterations, "batch": batch, "lr": lr,
        "steps": steps, "seconds_nograd_rollout": rollout,
        "seconds_per_iteration": statistics.median(history["seconds"]),
        "peak_mb_above_baseline": max(0.0, peak_rss_mb() - baseline), "graph_mb": max(history["graph_mb"]),
        "reward_mean": per_sample.mean(1).tolist(), "reward_std": per_sample.std(1).tolist(),
        "cumulative_seconds": seconds.tolist(), "final_reward": history["final_reward"],
        "reward_improvement": history["final_reward"] - per_sample[0].mean().item(),
        "threshold": THRESHOLDS[task],
        "seconds_to_threshold": seconds[reached[0, 0]].item() if len(reached) else None,
        "iterations_to_threshold": int(reached[0, 0]) if len(reached) else None,
        "success": accuracy(judge, final, labels),
        "fid_vs_heldout": frechet_distance(features(feat, final), features(feat, (heldout + 1) / 2)),
        "shell_drift": history["final_shell_drift"],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["model"], r["task"]) for r in results})
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.4 * len(combos)), squeeze=False)
    for row, (model, task) in enumerate(combos):
        for r in (x for x in results if x["model"] == model and x["task"] == task):
            mean, std = r["reward_mean"], r["reward_std"]
            its = range(len(mean))
            for ax, xs in ((axes[row, 0], list(its)), (axes[row, 1], r["cumulative_seconds"][: len(mean)])):
                ax.plot(xs, mean, label=r["policy"])
                ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.15)
        axes[row, 0].set(title=f"{model} / {task}", xlabel="iteration", ylabel="reward (mean ± std)")
        axes[row, 1].set(title=f"{model} / {task}", xlabel="seconds")
        for ax in axes[row]:
            ax.axhline(THRESHOLDS[task], color="gray", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit"])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "sdo_latent.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return emit(run_one(args.model, args.task, args.policy, args.iterations, args.batch, args.lr, args.steps))
    from tqdm.auto import tqdm

    configs = [(m, t, p) for m in args.models for t in args.tasks for p in args.policies]
    results = []
    for model, task, policy in tqdm(configs, desc="configurations"):
        results.append(run_child(__file__, ["--model", model, "--task", task, "--policy", policy, "--iterations",
                                            str(args.iterations), "--batch", str(args.batch), "--lr", str(args.lr),
                                            "--steps", str(args.steps)]))
        r = results[-1]
        print(f"{model} {task} {policy}: {r['seconds_per_iteration']:.2f}s/it "
              f"(rollout {r['seconds_nograd_rollout']:.2f}s) "
              f"reward {r['reward_mean'][0]:.3f}->{r['final_reward']:.3f} success {r['success']:.2f} "
              f"fid {r['fid_vs_heldout']:.1f} to-threshold {r['seconds_to_threshold']}", flush=True)
    summary = []
    for r in results:
        full = next((x for x in results if x["model"] == r["model"] and x["task"] == r["task"]
                     and x["policy"] == "full"), None)
        row = {k: r[k] for k in ("model", "task", "policy", "seconds_per_iteration", "final_reward", "success",
                                 "fid_vs_heldout", "shell_drift", "seconds_to_threshold")}
        row["time_vs_nograd_rollout"] = r["seconds_per_iteration"] / r["seconds_nograd_rollout"]
        if full:
            row["improvement_vs_full"] = (r["reward_improvement"] / full["reward_improvement"]
                                          if full["reward_improvement"] else None)
            row["time_vs_full"] = r["seconds_per_iteration"] / full["seconds_per_iteration"]
            if r["seconds_to_threshold"] is not None and full["seconds_to_threshold"]:
                row["threshold_seconds_vs_full"] = r["seconds_to_threshold"] / full["seconds_to_threshold"]
        summary.append(row)
    write_results(args.out, "sdo_latent", {"iterations": args.iterations, "batch": args.batch, "lr": args.lr,
                                           "steps": args.steps, "thresholds": THRESHOLDS, "summary": summary,
                                           "results": results})
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
