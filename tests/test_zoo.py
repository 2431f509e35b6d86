"""The shipped zoo: loads offline, and its models still pass their quality bars."""

import pytest
import torch

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import accuracy, frechet_distance
from diffusion_shortcuts.zoo.data import load_digits


@pytest.fixture(scope="module")
def judge():
    return ds.zoo.load("digits-classifier-eval")


@pytest.mark.parametrize("name,bar", [("digits-classifier", 0.97), ("digits-classifier-eval", 0.97)])
def test_classifier_heldout_accuracy_recomputed(name, bar):
    clf = ds.zoo.load(name)
    images, labels = load_digits("heldout")
    assert len(labels) == 1000 and torch.bincount(labels).tolist() == [100] * 10
    assert accuracy(clf, (images + 1) / 2, labels) >= bar
    assert not any(p.requires_grad for p in clf.parameters())


def test_heldout_set_is_disjoint_from_training_set():
    train, _ = load_digits("train")
    heldout, _ = load_digits("heldout")
    assert len(train) == 4000
    flat_train = {bytes(x.numpy().tobytes()) for x in train}
    assert sum(bytes(x.numpy().tobytes()) in flat_train for x in heldout) < 5  # MNIST has a few exact duplicates


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_generator_100_sample_check(name, judge):
    m = ds.zoo.load(name)
    assert isinstance(m, ds.zoo.ZooModel) and m.conditional
    labels = torch.arange(10).repeat_interleave(10)
    images = m.generate(labels, seed=123)
    assert images.shape == (100, 1, 16, 16)
    assert accuracy(judge, images, labels) >= 0.85


def test_unet_has_the_nine_sd15_blocks():
    m = ds.zoo.load("digits-unet")
    types = [type(b).__name__ for b in m.model.down_blocks]
    assert types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert type(m.model.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in m.model.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    cond = m.encode(torch.tensor([1, 2]))
    assert cond.shape == (2, 4, 64)


def test_bad_names_and_labels():
    with pytest.raises(ValueError, match="digits-unet"):
        ds.zoo.load("digits-gan")
    m = ds.zoo.load("digits-dit")
    with pytest.raises(ValueError, match="out of range"):
        m.encode(torch.tensor([11]))


def test_frechet_distance_closed_form():
    # two Gaussians with known means and diagonal covariances: FID = |mu|^2 + sum (s_a - s_b)^2 (std devs)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5]) + 1.0
    expected = 3 * 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_shipped_dipgo_schedules_fit_their_models(name):
    m = ds.zoo.load(name)
    ratios = m.schedule_ratios
    assert ratios == [0.5, 0.7, 0.8, 0.85]
    for ratio in ratios:  # one search per ratio, each within DiP-GO's tolerance of its ratio
        schedule = m.cache_schedule(ratio)
        assert abs(schedule.pruned_fraction - ratio) <= 0.0125 and not schedule.reuse[0].any()
        assert schedule.info["search"]["ratio"] == ratio and schedule.mode == "taylor1"
        with ds.prune.apply(m.model, schedule, m.sampler()):
            pass
    search = m.dipgo()  # the search from the full model, re-thresholded at any ratio
    assert abs(search.schedule(0.6).pruned_fraction - 0.6) <= 0.0125
    with pytest.raises(FileNotFoundError, match="no cache schedule at ratio 0.3"):
        m.cache_schedule(0.3)


def test_shipping_searches_one_per_ratio(tmp_path):
    """`python -m diffusion_shortcuts.zoo.dipgo NAME RUN ... [--search RUN]`: each run's schedule under its ratio,
    the pruner replaced only when asked, and the command that made each in the README."""
    import json
    import shutil

    from diffusion_shortcuts.zoo import ZOO_DIR
    from diffusion_shortcuts.zoo.dipgo import ship

    shipped = ZOO_DIR / "digits-dit" / "dipgo"
    runs = []
    for ratio, start in ((0.8, "every(interval=7, warmup=3):ab12"), (0.5, "")):
        run = tmp_path / f"run{ratio}"
        shutil.copytree(shipped / "pruner", run / "pruner")
        shutil.copy(shipped / "heatmap.png", run / "heatmap.png")
        history = json.loads((shipped / "search.json").read_text())
        history["settings"].update(ratio=ratio, reuse_mode="taylor1", start=start)
        if start:
            history["validation"] = {"samples": 8, "kept": "start", "ssim_searched": 0.98, "ssim_start": 0.99}
        (run / "search.json").write_text(json.dumps(history))
        ds.prune.CacheSchedule.load(shipped / "schedule-0.8.json").with_mode("taylor1").save(run / "schedule.json")
        runs.append(run)
    zoo = tmp_path / "zoo"
    with pytest.raises(FileNotFoundError, match="has no pruner"):
        ship("digits-dit", runs, zoo_dir=zoo)  # nothing shipped yet, and no --search
    dest = ship("digits-dit", runs, search=runs[1], zoo_dir=zoo)
    assert sorted(p.name for p in dest.glob("schedule-*.json")) == ["schedule-0.5.json", "schedule-0.8.json"]
    assert ds.prune.CacheSchedule.load(dest / "schedule-0.5.json").mode == "taylor1"
    assert (dest / "pruner").is_dir() and (dest / "runs" / "0.5" / "search.json").exists()
    readme = (dest / "README.md").read_text()
    assert "--ratio 0.8 --iterations 200 --batch-size 2 --gradient full --reuse-mode taylor1 --start-every 7" in readme
    assert "--ratio 0.5 --iterations 200 --batch-size 2 --gradient full --reuse-mode taylor1 --out" in readme
    assert "kept the start table" in readme
    # shipping schedules again keeps the pruner and replaces the schedules
    (dest / "pruner" / "marker").write_text("kept")
    ship("digits-dit", runs[:1], zoo_dir=zoo)
    assert (dest / "pruner" / "marker").exists() and not (dest / "schedule-0.5.json").exists()
    assert not (dest / "runs" / "0.5").exists()
    with pytest.raises(ValueError, match="one search per ratio"):
        ship("digits-dit", [runs[0], runs[0]], zoo_dir=zoo)
    with pytest.raises(FileNotFoundError, match="no schedule.json"):
        ship("digits-dit", [tmp_path], zoo_dir=zoo)
