"""Every job under `accelerate launch` with 2 CPU processes (gloo): the search equals one process with the doubled
batch and resumes after a kill to the same gates; sharded sample and optimize equal one process sample by sample; a
resume with another process count and fewer samples than processes are refused naming the numbers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_distributed import COMMANDS
from diffusion_shortcuts import cli, distributed

HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
# accelerate's multi-process CPU launch: torchrun through --multi_gpu, with ACCELERATE_USE_CPU (gloo)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2"]


def launch(args, port: int) -> subprocess.CompletedProcess:
    """Two processes; each launch its own port (a killed one may leave its port in use for a while)."""
    return subprocess.run([*LAUNCH, "--main_process_port", str(port), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600)


def one_process(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600)


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_the_search_on_two_processes_equals_one_with_the_doubled_batch_and_resumes_after_a_kill(tmp_path):
    script = HERE / "search_distributed.py"
    two, one, killed = (tmp_path / name for name in ("two", "one", "killed"))
    for folder in (two, one, killed):
        folder.mkdir()
    done = launch([script, two, 1], 29561)
    assert done.returncode == 0, done.stderr[-2000:]
    done = one_process([script, one, 2])
    assert done.returncode == 0, done.stderr[-2000:]
    rank0, rank1, single = (load_file(str(f)) for f in (two / "gates0.safetensors", two / "gates1.safetensors",
                                                        one / "gates0.safetensors"))
    assert rank0.keys() == single.keys()
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # every process holds the same gates
    # the same gates, up to the float noise of batching 1 + 1 rows instead of 2 (as test_cli_pipelines' fine-tuning
    # under accelerate); a sum instead of a mean over the processes would double the steps and show here
    difference = sum((rank0[k] - single[k]).square().sum() for k in single).sqrt()
    assert difference / sum(single[k].square().sum() for k in single).sqrt() < 1e-4
    history_two, history_one = (load_file(str(f / "history0.safetensors")) for f in (two, one))
    torch.testing.assert_close(history_two["ssim"], history_one["ssim"], rtol=1e-5, atol=1e-6)  # the global batch's
    assert torch.equal(history_two["macs_ratio"], history_one["macs_ratio"])  # the same hard gates every iteration
    assert history_one["macs_ratio"][-1] < 1.0  # and they moved: not a comparison of two untouched networks
    assert torch.equal(history_two["schedule"], history_one["schedule"]) and history_one["schedule"].any()

    # process 1 killed after iteration 3: the launch fails, the checkpoint the main process wrote resumes
    done = launch([script, killed, 1, "--kill-at", 3], 29562)
    assert done.returncode != 0 and not (killed / "gates0.safetensors").exists()
    assert torch.load(killed / "search_checkpoint.pt", weights_only=True)["iteration"] in (2, 4)
    done = launch([script, killed, 1, "--resume"], 29563)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_file(str(killed / "gates0.safetensors"))
    for key in rank0:
        assert torch.equal(resumed[key], rank0[key]), key
    # the same search resumed by one process: another process count, refused naming both
    done = one_process([script, killed, 1, "--resume"])
    assert done.returncode != 0 and "num_processes: checkpoint 2, this run 1" in done.stderr


def test_sample_optimize_and_prune_on_two_processes(tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    done = launch([HERE / "cli_distributed.py", two], 29564)
    assert done.returncode == 0, done.stderr[-3000:]
    for verb, argv in COMMANDS.items():
        assert cli.main([*argv, "--out", str(one / verb)]) == 0, capsys.readouterr().err
    for rank in (0, 1):
        codes = json.loads((two / f"codes-{rank}.json").read_text())
        assert codes == {"sample": 0, "optimize": 0, "prune": 0, "too_few": 2}, rank
    assert "--n 1 samples: 1 for 2 processes" in done.stderr and not (two / "too_few").exists()

    # sample: the processes took samples [0, 3) and [3, 5); the gathered grid is one process's, pixel for pixel
    sharded, single = metrics_of(two / "sample"), metrics_of(one / "sample")
    assert sharded["num_processes"] == 2 and sharded["shards"] == [[0, 3], [3, 5]]
    assert single["num_processes"] == 1 and single["shards"] == [[0, 5]]
    assert sharded["accuracy"] == single["accuracy"]
    grids = [np.asarray(Image.open(folder / "sample" / "grid.png"), dtype=np.int16) for folder in (two, one)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1

    # optimize: every sample's latents are what one process made of it (seeds follow the sample's index)
    sharded, single = metrics_of(two / "optimize"), metrics_of(one / "optimize")
    assert sharded["num_processes"] == 2 and sharded["shards"] == [[0, 2], [2, 3]]
    latents = [load_file(str(folder / "optimize" / "latents.safetensors")) for folder in (two, one)]
    assert torch.equal(latents[0]["initial_noise"], latents[1]["initial_noise"])
    torch.testing.assert_close(latents[0]["latents"], latents[1]["latents"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents[1]["latents"], latents[1]["initial_noise"])  # the latents were optimized
    assert sharded["reward"] == pytest.approx(single["reward"], rel=1e-4, abs=1e-6)
    assert sharded["final_reward"] == pytest.approx(single["final_reward"], rel=1e-4, abs=1e-6)

    # prune: the main process alone wrote the schedule and the figures; one process may not resume the search
    sharded = metrics_of(two / "prune")
    assert sharded["num_processes"] == 2 and sharded["search_settings"]["num_processes"] == 2
    assert (two / "prune" / "schedule.json").exists() and not list((two / "prune").glob(".*.tmp"))
    capsys.readouterr()
    code = cli.main([*COMMANDS["prune"], "--resume", "--out", str(two / "prune")])
    err = capsys.readouterr().err
    assert code == 2 and "num_processes: checkpoint 2, this run 1" in err and len(err.strip().splitlines()) == 1


def test_a_dead_worker_is_one_line_naming_the_checkpoint_and_resume(tmp_path):
    """Process 1 killed at the search's iteration 3: the survivor says in one line that a process of the launch
    failed, where the last checkpoint is and that --resume continues; no traceback of gloo's."""
    out = tmp_path / "killed"
    done = launch([HERE / "cli_killed.py", 3, *COMMANDS["prune"], "--iterations", "6", "--out", out], 29565)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("diffusion-shortcuts prune: error:")]
    assert len(ours) == 1, done.stderr[-3000:]
    assert "diffusion_shortcuts" not in done.stderr.replace(ours[0], "")  # no traceback through our code
    assert not any(line.startswith("RuntimeError") for line in done.stderr.splitlines())  # nor gloo's raw error
    assert "a process of the launch failed (" in ours[0] and "pair.cc" not in ours[0]
    assert ours[0].endswith(f"the last checkpoint is {out / 'search_checkpoint.pt'}: run the same command with "
                            "--resume to continue")


def test_sigterm_from_the_launcher_is_one_line_naming_the_checkpoint(monkeypatch, tmp_path):
    """torchrun's agent SIGTERMs the processes left when one exits, often before their next collective fails: under
    a launch, SIGTERM raises LaunchStopped in the command (one line, what was kept), and the handler before it comes
    back after; outside a launch SIGTERM is left alone."""
    import signal

    from diffusion_shortcuts.failures import explain

    before = signal.getsignal(signal.SIGTERM)
    with distributed.sigterm_stops_the_command():
        assert signal.getsignal(signal.SIGTERM) is before  # not launched: untouched
    monkeypatch.setattr(distributed, "launched", lambda: True)
    with pytest.raises(distributed.LaunchStopped) as stopped:
        with distributed.sigterm_stops_the_command():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is before
    line, code = explain("prune", stopped.value, {"out": tmp_path}, {})
    assert code == 1 and line.startswith("a process of the launch failed (the launcher stopped this one with SIGTERM")


def processes_naming(text: str) -> list[int]:
    """The ids of the running processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_the_processes_of_a_launcher_killed_with_sigkill_stop_and_keep_their_checkpoint(tmp_path):
    out = tmp_path / "orphaned"
    argv = [*COMMANDS["prune"], "--iterations", "100000", "--out", str(out)]
    launcher = subprocess.Popen([*LAUNCH, "--main_process_port", "29566", "-m", "diffusion_shortcuts.cli", *argv],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "search_checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = [pid for pid in processes_naming(str(out)) if pid != launcher.pid]
        assert (out / "search_checkpoint.pt").exists() and len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 60
        while processes_naming(str(out)) and time.time() < deadline:
            time.sleep(0.2)
        assert processes_naming(str(out)) == []  # both stopped, not left running 100000 iterations
        assert torch.load(out / "search_checkpoint.pt", weights_only=True)["iteration"] >= 1
    finally:
        for pid in processes_naming(str(out)):
            os.kill(pid, 9)


def test_a_cpu_launch_that_starts_one_process_says_so(tmp_path):
    """accelerate's `--cpu --num_processes 2` without --multi_gpu runs one process: the command says so and how to
    launch two; metrics.json says one ran."""
    plain = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
             "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_shortcuts.cli"]
    sample = ["sample", "--model", "digits-dit", "--n", "2", "--steps", "2", "--out", str(tmp_path / "o")]
    done = subprocess.run([*plain, *sample], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: accelerate launch was asked for several processes but started one" in done.stderr
    assert f"for P processes on the CPU: {distributed.MULTI_PROCESS_CPU}" in done.stderr
    assert metrics_of(tmp_path / "o")["num_processes"] == 1


@pytest.mark.parametrize("n,processes", [(5, 2), (7, 3), (4, 4), (10, 1)])
def test_shards_are_contiguous_nearly_equal_and_cover_every_sample_once(n, processes):
    shards = [distributed.shard(n, processes, rank) for rank in range(processes)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert sorted(map(len, shards), reverse=True) == list(map(len, shards))  # the first processes take the extra


def test_fewer_items_than_processes_are_refused_naming_both_numbers():
    distributed.check_shardable(2, "--n 2 samples", processes=2)
    with pytest.raises(ValueError, match="--n 1 samples: 1 for 2 processes"):
        distributed.check_shardable(1, "--n 1 samples", processes=2)


def test_each_process_of_a_multi_gpu_launch_works_on_its_own_gpu(monkeypatch):
    assert distributed.local_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device("cuda") == torch.device("cuda", 3)
    assert distributed.local_device("cpu") == torch.device("cpu")
