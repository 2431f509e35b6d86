"""SDO reward fine-tuning against the other gradient policies: ``python benchmarks/sdo_finetune.py``.

Task: make a class-conditional model draw every class more clearly without guidance. The reward is
``log p(label | image)`` under digits-classifier (``DigitClass(None)``), sampled with DDIM 50 steps and
guidance 1 (where the base models' eval accuracy is about 0.82-0.84, against 0.98-1.0 at their guidance 3),
so the whole model must change: no single latent or step does it. Configurations: digits-unet with a
rank-4 LoRA, digits-unet with all weights, digits-dit with a rank-4 LoRA.

Policies Full, Checkpointed, Truncated(1) (DRaFT-1), Truncated(5) (DRaFT-5), RandomTruncated (AlignProp)
and Shortcut(random) (SDO), each in its own process and each given the same wall-clock training budget
(evaluation not counted); ``--policies shortcut+base=0.5 full+ema=0.9`` adds the regularisers. Per process:

- cost: a no-grad rollout of the training batch and one policy iteration (sampling with the policy's
  graph, reward, backward) timed alternately, median of 3 after a warm-up; peak RSS above the baseline
  left by the warm-up (the probe runs before anything else can raise the high-water mark);
- held-out figures at about six points of the budget, on fixed noise (5 per class, 50 samples): the
  reward, digits-classifier-eval accuracy (never a reward) and diversity (mean pairwise RMS distance of
  samples of one class; collapse shows as a fall).

Writes benchmarks/results/sdo_finetune.json and sdo_finetune.png. ``--jobs 2`` runs two processes at a
time (one torch thread each); timings are ratios taken inside one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, emit, peak_rss_mb, run_child, write_results  # noqa: E402

THRESHOLD = -0.05  # held-out mean log p(label | image): about p = 0.95 on average
POLICIES = ["full", "checkpointed", "truncated:1", "truncated:5", "random_truncated", "shortcut"]
CONFIGS = {"unet-lora": ("digits-unet", "lora", 1e-3), "unet-all": ("digits-unet", "all", 1e-4),
           "dit-lora": ("digits-dit", "lora", 1e-3)}


def policy_of(name: str):
    """A policy name with optional regularisers: ``shortcut``, ``full+base=0.5``, ``shortcut+ema=0.9``."""
    from diffusion_shortcuts.gradients import resolve

    policy, *options = name.split("+")
    regularisers = {"base_weight": 0.0, "ema": None}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("base", "ema"):
            raise ValueError(f"unknown regulariser {option!r} in {name!r}; known: base=W, ema=D")
        regularisers["base_weight" if key == "base" else "ema"] = float(value)
    return resolve("shortcut:random" if policy == "shortcut" else policy), regularisers


def probe_cost(sampler, policy, reward, noise, cond, labels, params) -> dict:
    """Seconds of a no-grad rollout and of one policy iteration (no optimizer step), timed alternately;
    peak RSS of the iteration above the rollout's."""
    import torch

    from diffusion_shortcuts.metrics import timed_pair

    def rollout():
        with torch.no_grad():
            sampler(noise, cond)

    def iteration():
        images = sampler(noise, cond, gradient=policy, generator=torch.Generator().manual_seed(0))
        (-reward(images, labels).mean()).backward()
        for p in params:
            p.grad = None

    rollout()
    rollout()
    baseline = peak_rss_mb()
    iteration()
    peak = peak_rss_mb() - baseline
    seconds_rollout, seconds_iteration = timed_pair(rollout, iteration, repeats=3)
    return {"seconds_nograd_rollout": seconds_rollout, "seconds_iteration_probe": seconds_iteration,
            "peak_mb_above_rollout": max(0.0, peak)}


def run_one(config: str, policy_name: str, budget: float, batch: int, steps: int, rank: int, seed: int) -> dict:
    import torch

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import accuracy

    torch.manual_seed(seed)
    model_name, params, lr = CONFIGS[config]
    m = ds.zoo.load(model_name)
    sampler = m.sampler(steps, guidance_scale=1.0)
    if params == "lora":
        add_names = ds.add_lora(m.model, rank=rank, seed=seed)
        trainable = [p for n, p in m.model.named_parameters() if n in add_names]
    else:
        trainable = [p.requires_grad_(True) for p in m.model.parameters()]
    reward = ds.rewards.DigitClass(None)
    policy, regularisers = policy_of(policy_name)
    labels = torch.arange(batch) % 10
    noise = m.noise(batch, torch.Generator().manual_seed(99))
    cost = probe_cost(sampler, policy, reward, noise, m.encode(labels), labels, trainable)
    per_iteration = cost["seconds_iteration_probe"]
    evaluations = 6
    every = max(1, round(budget / evaluations / per_iteration))
    judge_model = ds.zoo.load("digits-classifier-eval")
    heldout = ds.HeldOut.per_condition(torch.arange(10), 5, m.sample_shape, seed=12345, every=every, batch_size=25,
                                       judge=lambda images, lab: {"accuracy": accuracy(judge_model, images, lab)})
    result = ds.finetune(sampler, reward, torch.arange(10), m.sample_shape, params=params, gradient=policy,
                         iterations=100_000, batch_size=batch, lr=lr, seed=seed, encode=m.encode, heldout=heldout,
                         progress=False, **regularisers, callback=lambda event: event["elapsed"] >= budget)
    history = result.history
    return {"config": config, "model": model_name, "params": params, "lr": lr, "policy": policy_name,
            "gradient": repr(policy), "budget_seconds": budget, "batch": batch, "steps": steps, "rank": rank,
            **cost, "iterations": len(history["reward"]), "eval_every": every,
            "seconds_per_iteration": statistics.median(history["seconds"]),
            "train_reward": history["reward"], "eval": history["eval"]}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        first, last = r["eval"][0], r["eval"][-1]
        full = next((x for x in results if x["config"] == r["config"] and x["policy"] == "full"), None)
        row = {"config": r["config"], "policy": r["policy"], "iterations": r["iterations"],
               "seconds_per_iteration": r["seconds_per_iteration"],
               "iteration_vs_nograd_rollout": r["seconds_iteration_probe"] / r["seconds_nograd_rollout"],
               "peak_mb_above_rollout": r["peak_mb_above_rollout"],
               "reward_start": first["reward"], "reward_end": last["reward"],
               "accuracy_start": first["accuracy"], "accuracy_end": last["accuracy"],
               "diversity_start": first["diversity"], "diversity_end": last["diversity"],
               "seconds_end": last["seconds"],
               "reward_at_half_budget": max((e for e in r["eval"] if e["seconds"] <= r["budget_seconds"] / 2),
                                            key=lambda e: e["seconds"])["reward"],
               "seconds_to_threshold": next((e["seconds"] for e in r["eval"] if e["reward"] >= THRESHOLD), None),
               "budget_in_rollouts": last["seconds"] / r["seconds_nograd_rollout"]}
        if full is not None and full["peak_mb_above_rollout"] > 0:
            row["memory_vs_full"] = r["peak_mb_above_rollout"] / full["peak_mb_above_rollout"]
        rows.append(row)
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in results))
    fig, axes = plt.subplots(len(configs), 4, figsize=(17, 3.3 * len(configs)), squeeze=False)
    for row, config in enumerate(configs):
        for r in (x for x in results if x["config"] == config):
            ev = r["eval"]
            its, secs = [e["iteration"] for e in ev], [e["seconds"] for e in ev]
            axes[row, 0].plot(its, [e["reward"] for e in ev], marker=".", label=r["policy"])
            axes[row, 1].plot(secs, [e["reward"] for e in ev], marker=".", label=r["policy"])
            axes[row, 2].plot(secs, [e["accuracy"] for e in ev], marker=".", label=r["policy"])
            axes[row, 3].plot(secs, [e["diversity"] for e in ev], marker=".", label=r["policy"])
        for ax, (x, y) in zip(axes[row], [("iteration", "held-out reward"), ("training seconds", "held-out reward"),
                                          ("training seconds", "eval accuracy"), ("training seconds", "diversity")]):
            ax.set(title=config, xlabel=x, ylabel=y)
            ax.grid(alpha=0.3)
        for ax in axes[row, :2]:
            ax.axhline(THRESHOLD, color="gray", lw=0.8, ls="--")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def print_table(summary: list[dict]) -> None:
    print("| config | policy | its | s/it | it vs rollout | peak MB | vs Full | reward at half budget | reward | "
          f"s to {THRESHOLD} | accuracy | diversity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['config']} | {s['policy']} | {s['iterations']} | {s['seconds_per_iteration']:.2f} | "
              f"{s['iteration_vs_nograd_rollout']:.2f} | {s['peak_mb_above_rollout']:.0f} | "
              f"{s.get('memory_vs_full', float('nan')):.3f} | {s['reward_at_half_budget']:.3f} | "
              f"{s['reward_start']:.3f} -> {s['reward_end']:.3f} | "
              f"{'-' if s['seconds_to_threshold'] is None else round(s['seconds_to_threshold'])} | "
              f"{s['accuracy_start']:.2f} -> {s['accuracy_end']:.2f} | "
              f"{s['diversity_start']:.3f} -> {s['diversity_end']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds per policy")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "sdo_finetune.json")
    parser.add_argument("--replot", action="store_true", help="redraw the plot and table from --out")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the configurations run now in an existing --out (a re-run after noise)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return emit(run_one(args.config, args.policy, args.budget, args.batch, args.steps, args.rank, args.seed))
    if args.replot:
        data = json.loads(args.out.read_text())
        plot(data["results"], args.out.with_suffix(".png"))
        return print_table(summarise(data["results"]))

    def child(combo):
        config, policy = combo
        r = run_child(__file__, ["--config", config, "--policy", policy, "--budget", str(args.budget), "--batch",
                                 str(args.batch), "--steps", str(args.steps), "--rank", str(args.rank), "--seed",
                                 str(args.seed)])
        print(f"{config} {policy}: {r['iterations']} its, {r['seconds_per_iteration']:.2f}s/it "
              f"(rollout {r['seconds_nograd_rollout']:.2f}s), reward {r['eval'][0]['reward']:.3f} -> "
              f"{r['eval'][-1]['reward']:.3f}, accuracy {r['eval'][-1]['accuracy']:.2f}", flush=True)
        return r

    combos = [(c, p) for c in args.configs for p in args.policies]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(child, combos))
    earlier_commands = []
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        earlier_commands = old.get("earlier_commands", []) + [old["command"]]
        rerun = {(r["config"], r["policy"]): r for r in results}
        results = [rerun.pop((r["config"], r["policy"]), r) for r in old["results"]] + list(rerun.values())
    summary = summarise(results)
    write_results(args.out, "sdo_finetune", {"budget_seconds": args.budget, "batch": args.batch, "steps": args.steps,
                                             "rank": args.rank, "seed": args.seed, "jobs": args.jobs,
                                             "earlier_commands": earlier_commands,
                                             "summary": summary, "results": results})
    plot(results, args.out.with_suffix(".png"))
    print_table(summary)


if __name__ == "__main__":
    main()
