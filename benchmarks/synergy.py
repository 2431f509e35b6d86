"""Both shortcuts together: SDO with the zoo's DiP-GO search (``m.dipgo().schedule(0.8)``) on its no-grad rollout.

Two tasks on digits-unet and digits-dit (DDIM 50 steps), each variant in its own process.

Latent optimization (``--parts latent``): guidance 3, a batch of 8 noises steered to a target digit
((seed + 3) mod 10, reward ``log p(digit | image)`` under digits-classifier), 20 Adam iterations, lr 0.05,
the default sphere prior.

LoRA fine-tuning (``--parts finetune``), the task of ``sdo_finetune.py``: guidance 1, every class drawn more
clearly (reward ``log p(label | image)``), rank-4 LoRA, batch 4, AdamW lr 1e-3, 40 iterations (equal
iterations for every variant). The graph step is drawn at random (``Shortcut(step="random")``), so it falls
on steps the schedule prunes: the "full graph step" variant computes every block there. Snapshots of the
adapter every 10 iterations are evaluated after training, always on the unpruned model (50 held-out samples,
5 per class): the held-out reward and digits-classifier-eval accuracy at equal iterations and at equal
training seconds (the snapshot each variant had reached when the fastest finished).

The variants:

- ``full``: plain backpropagation through the unpruned model;
- ``shortcut``: SDO (one step's graph) on the unpruned model;
- ``shortcut+schedule``: SDO with the zoo search's 0.8 schedule applied to every call, the graph step included;
- ``shortcut+schedule, full graph step``: the schedule on the no-grad rollout only, the graph step computes
  every block.

Seconds per iteration (median), the autograd graph kept (MB) and peak RSS, the reward at equal iterations and at
equal wall-clock (at the time the fastest variant finished), and success judged by digits-classifier-eval (never
a reward). Also the cosine between the first iteration's gradient with and without the schedule.

    OMP_NUM_THREADS=2 python benchmarks/synergy.py [--parts latent finetune]   # benchmarks/results/synergy.json

A run of one part keeps the other part's results in the file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, emit, peak_rss_mb, run_child, write_results  # noqa: E402

VARIANTS = ["full", "shortcut", "shortcut+schedule", "shortcut+schedule, full graph step"]


def task(m, batch: int):
    import torch

    import diffusion_shortcuts as ds

    seeds = list(range(batch))
    noise = torch.cat([m.noise(1, torch.Generator().manual_seed(s)) for s in seeds])
    cond = m.encode(torch.full((batch,), m.null_label)).detach()
    targets = torch.tensor([(s + 3) % 10 for s in seeds])
    return noise, cond, ds.rewards.DigitClass(targets), targets


def context(m, sampler, variant: str):
    from diffusion_shortcuts.prune import apply

    if "schedule" not in variant:
        return nullcontext()
    return apply(m.model, m.dipgo().schedule(0.8), sampler, full_graph_steps="full graph step" in variant)


def run_one(model_name: str, variant: str, iterations: int, batch: int, lr: float) -> dict:
    import torch

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import accuracy

    torch.manual_seed(0)
    m = ds.zoo.load(model_name)
    sampler = m.sampler(50)
    noise, cond, reward, targets = task(m, batch)
    policy = "full" if variant == "full" else "shortcut"
    with context(m, sampler, variant):
        result = ds.optimize_latents(sampler, reward, noise, cond, iterations=iterations, lr=lr, gradient=policy,
                                     progress=False)
    judge = ds.zoo.load("digits-classifier-eval")
    history = result.history
    return {"model": model_name, "variant": variant, "seconds": history["seconds"], "reward": history["reward"],
            "final_reward": history["final_reward"], "graph_mb": statistics.median(history["graph_mb"]),
            "peak_rss_mb": peak_rss_mb(), "success": accuracy(judge, result.images.clamp(0, 1), targets),
            "seconds_per_iteration": statistics.median(history["seconds"])}


def finetune_one(model_name: str, variant: str, iterations: int, batch: int, lr: float, every: int = 10) -> dict:
    """LoRA fine-tuning with ``variant``'s gradient and rollout; snapshots evaluated unpruned afterwards."""
    import torch

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import accuracy

    torch.manual_seed(0)
    m = ds.zoo.load(model_name)
    sampler = m.sampler(50, guidance_scale=1.0)
    names = set(ds.add_lora(m.model, rank=4, seed=0))
    trainable = {n: p for n, p in m.model.named_parameters() if n in names}
    snapshots = []

    def snapshot(info):
        if (info["iteration"] + 1) % every == 0:
            snapshots.append((info["iteration"] + 1, info["elapsed"],
                              {n: p.detach().clone() for n, p in trainable.items()}))

    snapshots.append((0, 0.0, {n: p.detach().clone() for n, p in trainable.items()}))
    reward = ds.rewards.DigitClass(None)
    policy = "full" if variant == "full" else "shortcut:random"
    with context(m, sampler, variant):
        result = ds.finetune(sampler, reward, torch.arange(10), params="lora", gradient=policy, iterations=iterations,
                             batch_size=batch, lr=lr, seed=0, encode=m.encode, progress=False, callback=snapshot)
    judge = ds.zoo.load("digits-classifier-eval")
    heldout = ds.HeldOut.per_condition(torch.arange(10), 5, m.sample_shape, seed=12345, batch_size=25,
                                       judge=lambda images, labels: {"accuracy": accuracy(judge, images, labels)})
    evaluations = []
    for done, seconds, weights in snapshots:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(weights[n])
        evaluations.append({"iteration": done, "seconds": seconds, **heldout.evaluate(sampler, reward, m.encode)})
    history = result.history
    return {"model": model_name, "variant": variant, "seconds": history["seconds"], "train_reward": history["reward"],
            "seconds_per_iteration": statistics.median(history["seconds"]), "peak_rss_mb": peak_rss_mb(),
            "eval": evaluations}


def at_equal_seconds(row: dict, budget: float) -> dict:
    """The latest evaluated snapshot made within ``budget`` seconds of training."""
    return max((e for e in row["eval"] if e["seconds"] <= budget + 1e-9), key=lambda e: e["seconds"])


def run_finetune(models, iterations: int, batch: int, lr: float) -> dict:
    results = {}
    for name in models:
        rows = {v: run_child(__file__, ["finetune", name, v, str(iterations), str(batch), str(lr)]) for v in VARIANTS}
        fastest = min(sum(r["seconds"]) for r in rows.values())
        full_time = rows["full"]["seconds_per_iteration"]
        for variant, row in rows.items():
            first, last = row["eval"][0], row["eval"][-1]
            row["time_vs_full"] = row["seconds_per_iteration"] / full_time
            row["at_equal_seconds"] = at_equal_seconds(row, fastest)
            print(f"{name:12s} {variant:36s} {row['seconds_per_iteration']:.3f} s/it "
                  f"({row['time_vs_full']:.2f}x full)  "
                  f"held-out reward {first['reward']:.3f} -> {last['reward']:.3f}, accuracy {first['accuracy']:.2f} -> "
                  f"{last['accuracy']:.2f}; at {fastest:.0f} s: {row['at_equal_seconds']['reward']:.3f} / "
                  f"{row['at_equal_seconds']['accuracy']:.2f}", flush=True)
        gain = {v: r["eval"][-1]["reward"] - r["eval"][0]["reward"] for v, r in rows.items()}
        results[name] = {"rows": rows, "equal_seconds": fastest,
                         "gain_vs_shortcut": {v: gain[v] / gain["shortcut"] for v in rows}}
    return results


def gradient_cosine(model_name: str, batch: int) -> float:
    """The first SDO gradient with the schedule on every call against the unpruned model's."""
    import torch

    import diffusion_shortcuts as ds

    m = ds.zoo.load(model_name)
    sampler = m.sampler(50)
    noise, cond, reward, _ = task(m, batch)
    grads = []
    for variant in ("shortcut", "shortcut+schedule"):
        x = noise.clone().requires_grad_(True)
        with context(m, sampler, variant):
            reward(sampler(x, cond, gradient="shortcut"), cond).sum().backward()
        grads.append(x.grad.flatten())
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


def at_seconds(row: dict, budget: float) -> float:
    """The reward reached within ``budget`` seconds of iterations."""
    total, best = 0.0, row["reward"][0]
    for seconds, value in zip(row["seconds"], row["reward"]):
        total += seconds
        if total > budget:
            break
        best = value
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=6, metavar=("PART", "MODEL", "VARIANT", "ITERATIONS", "BATCH", "LR"))
    parser.add_argument("--parts", nargs="+", choices=["latent", "finetune"], default=["latent", "finetune"])
    parser.add_argument("--models", nargs="*", default=["digits-unet", "digits-dit"])
    parser.add_argument("--iterations", type=int, default=20, help="latent optimization's")
    parser.add_argument("--batch", type=int, default=8, help="latent optimization's")
    parser.add_argument("--lr", type=float, default=0.05, help="latent optimization's")
    parser.add_argument("--finetune-iterations", type=int, default=40)
    args = parser.parse_args(argv)
    if args.child:
        part, name, variant, iterations, batch, lr = args.child
        run = run_one if part == "latent" else finetune_one
        emit(run(name, variant, int(iterations), int(batch), float(lr)))
        return 0
    path = RESULTS / "synergy.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload = {k: v for k, v in payload.items() if k in ("latent", "finetune")}
    if "finetune" in args.parts:
        payload["finetune"] = {"command": "python benchmarks/synergy.py --parts finetune",
                               "iterations": args.finetune_iterations, "batch": 4, "lr": 1e-3, "rank": 4,
                               "guidance": 1.0, "results": run_finetune(args.models, args.finetune_iterations, 4, 1e-3)}
    if "latent" in args.parts:
        payload["latent"] = {"command": "python benchmarks/synergy.py --parts latent",
                             "iterations": args.iterations, "batch": args.batch, "lr": args.lr,
                             "results": run_latent(args)}
    write_results(path, "synergy", payload)
    return 0


def run_latent(args) -> dict:
    results = {}
    for name in args.models:
        rows = {v: run_child(__file__, ["latent", name, v, str(args.iterations), str(args.batch), str(args.lr)])
                for v in VARIANTS}
        fastest = min(sum(r["seconds"]) for r in rows.values())
        full_time = rows["full"]["seconds_per_iteration"]
        for variant, row in rows.items():
            row["time_vs_full"] = row["seconds_per_iteration"] / full_time
            row["reward_at_equal_seconds"] = at_seconds(row, fastest)
            print(f"{name:12s} {variant:36s} {row['seconds_per_iteration']:.3f} s/it ({row['time_vs_full']:.2f}x full)"
                  f"  graph {row['graph_mb']:.1f} MB  reward {row['reward'][0]:.3f} -> {row['final_reward']:.3f}"
                  f"  at {fastest:.0f} s {row['reward_at_equal_seconds']:.3f}  judged {row['success']:.2f}", flush=True)
        gain = {v: rows[v]["final_reward"] - rows[v]["reward"][0] for v in rows}
        results[name] = {"rows": rows, "equal_seconds": fastest, "gradient_cosine": gradient_cosine(name, args.batch),
                         "gain_vs_shortcut": {v: gain[v] / gain["shortcut"] for v in rows}}
        print(f"{name}: gradient cosine with/without the schedule {results[name]['gradient_cosine']:.3f}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
