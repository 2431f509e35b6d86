"""Faults users meet on real hardware, and files loaded without trusting them: each ends in one line that says
what was kept and what to run, never a traceback, never code run from a file."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import diffusion_shortcuts as ds
from diffusion_shortcuts import cli
from diffusion_shortcuts.checkpoints import CheckpointError, load_checkpoint, write_atomically
from diffusion_shortcuts.metrics import frechet_distance
from diffusion_shortcuts.prune import CacheSchedule, ScheduleError

TRAIN = {  # the resumable verbs, small, with a checkpoint after every iteration
    "finetune": ["finetune", "--model", "digits-dit", "--reward", "label", "--rank", "2", "--iterations", "3",
                 "--batch-size", "1", "--steps", "3", "--eval-every", "100", "--eval-samples", "2",
                 "--checkpoint-every", "1"],
    "prune": ["prune", "--model", "digits-dit", "--iterations", "3", "--batch-size", "1", "--steps", "4",
              "--samples", "4", "--checkpoint-every", "1"],
}
CHECKPOINT = {"finetune": "finetune_checkpoint.pt", "prune": "search_checkpoint.pt"}
OPTIMIZE = ["optimize", "--model", "digits-dit", "--reward", "digit:3", "--iterations", "3", "--n", "2",
            "--steps", "3"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err.split("\n")[-1], err


class Evil:
    """Unpickled, it would make a folder: the marker that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ---- checkpoints are never unpickled ----------------------------------------------------------------------

@pytest.mark.parametrize("verb", sorted(TRAIN))
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(verb, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    torch.save({"settings": {}, "iteration": 1, "payload": Evil(marker)}, out / CHECKPOINT[verb])
    code, line, err = run([*TRAIN[verb], "--resume", "--out", out], capsys)
    assert code == 2 and "holds Python objects besides tensors and plain data (posix.mkdir)" in line, err
    assert "start afresh in another folder" in line and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="is not loaded"):
        load_checkpoint(out / CHECKPOINT[verb])
    assert not marker.exists()


# ---- exact flags only -------------------------------------------------------------------------------------

def flags_of_each_verb():
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for verb, sub in verbs.items():
        names = {s for a in sub._actions for s in a.option_strings}
        for name in sorted(n for n in names if n.startswith("--")):
            prefix = name[:-1]
            if prefix not in names and len(prefix) > 2:
                yield verb, name, prefix


def test_a_prefix_of_any_flag_of_any_verb_is_refused(capsys):
    tried = 0
    for verb, name, prefix in flags_of_each_verb():
        with pytest.raises(SystemExit) as exit_:
            cli.build_parser().parse_args([verb, prefix, "1", "--out", "x", "--reward", "label"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"unrecognized arguments: {prefix}" in err, (verb, name, err)
        tried += 1
    assert tried > 80  # every flag of every verb but those whose prefix is another flag


def test_the_schedule_flag_is_never_taken_for_the_scheduler(tmp_path, capsys):
    code, line, err = run(["finetune", "--model", "digits-dit", "--reward", "label", "--schedul", "zoo:0.8",
                           "--out", tmp_path / "o"], capsys)
    assert code == 2 and "unrecognized arguments: --schedul" in line


# ---- the output folder ------------------------------------------------------------------------------------

def test_out_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    code, line, _ = run(["sample", "--model", "digits-dit", "--n", "2", "--out", tmp_path / "f"], capsys)
    assert code == 2
    assert line.endswith(f"--out {tmp_path / 'f'} is a file; name a folder (new or one of an earlier run)")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("error,cause", [(errno.EROFS, "Read-only file system"),
                                         (errno.ENOSPC, "No space left on device")])
def test_an_out_that_cannot_be_written_names_the_folder_and_the_cause(error, cause, tmp_path, capsys, monkeypatch):
    real = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".diffusion-shortcuts.lock"):
            raise OSError(error, os.strerror(error))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    code, line, _ = run(["sample", "--model", "digits-dit", "--n", "2", "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"--out {tmp_path / 'o'}: output folder is not writable ({cause})" in line


# ---- out of memory ----------------------------------------------------------------------------------------

def out_of_memory_at(monkeypatch, when):
    """The denoiser raises torch.OutOfMemoryError at the first call for which ``when(calls)`` is true."""
    real, calls = ds.Sampler._predict, [0]

    def predict(self, *args, **kwargs):
        calls[0] += 1
        if when(calls[0]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ds.Sampler, "_predict", predict)


@pytest.mark.parametrize("verb", sorted(TRAIN))
@pytest.mark.parametrize("later", [False, True], ids=["first iteration", "after a checkpoint"])
def test_out_of_memory_is_one_line_with_the_flags_that_lower_it_and_keeps_the_checkpoint(verb, later, tmp_path,
                                                                                        capsys, monkeypatch):
    out = tmp_path / "o"
    checkpoint = out / CHECKPOINT[verb]
    out_of_memory_at(monkeypatch, (lambda calls: checkpoint.exists()) if later else (lambda calls: True))
    code, line, err = run([*TRAIN[verb], "--out", out], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert "out of memory on cpu (peak " in line and " MB so far); lower it with --gradient shortcut or " \
        "checkpointed" in line and "a smaller --batch-size" in line and "--dtype bfloat16" in line
    if later:
        assert f"the last checkpoint is {checkpoint}: run the same command with --resume" in line
        assert load_checkpoint(checkpoint)["iteration"] >= 1
    else:
        assert "nothing was checkpointed yet" in line and not checkpoint.exists()


def test_out_of_memory_in_optimize_names_its_own_flags(tmp_path, capsys, monkeypatch):
    out_of_memory_at(monkeypatch, lambda calls: calls > 5)
    code, line, _ = run([*OPTIMIZE, "--out", tmp_path / "o"], capsys)
    assert code == 1 and "--vae-checkpointing" in line and "a smaller --n" in line and "batch-size" not in line


# ---- interrupted at the wrong moment ----------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_temporary_file_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "finetune_checkpoint.pt"
    stale = tmp_path / f".finetune_checkpoint.pt.{dead_pid()}.tmp"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".finetune_checkpoint.pt.{alive.pid}.tmp"
        stale.write_bytes(b"half")
        live.write_bytes(b"being written")
        write_atomically(target, lambda tmp: tmp.write_bytes(b"whole"))
        assert not stale.exists() and live.exists() and target.read_bytes() == b"whole"
    finally:
        alive.kill()
        alive.wait()


def test_the_next_run_cleans_what_a_killed_run_left_in_its_folder(tmp_path, capsys):
    """A kill during the first checkpoint write leaves a temporary file, a kill anywhere the lock with a dead
    process's id: the next run into the folder removes both (a live writer's temporary file is kept)."""
    out = tmp_path / "o"
    out.mkdir()
    dead = dead_pid()
    stale = out / f".finetune_checkpoint.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    (out / ".diffusion-shortcuts.lock").write_text(str(dead))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".metrics.json.{alive.pid}.tmp"
        live.write_bytes(b"being written")
        code, _, err = run(["sample", "--model", "digits-dit", "--n", "1", "--steps", "1", "--out", out], capsys)
        assert code == 0, err
        assert not stale.exists() and live.exists() and not (out / ".diffusion-shortcuts.lock").exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_full_disk_while_taking_the_folder_leaves_no_empty_lock(tmp_path, capsys, monkeypatch):
    from diffusion_shortcuts import outdir

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outdir.os, "fdopen", FullDisk)
    code, line, err = run(["sample", "--model", "digits-dit", "--n", "1", "--steps", "1", "--out", tmp_path / "o"],
                          capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert line.endswith(f"--out {tmp_path / 'o'}: cannot write its lock file (No space left on device)")
    assert not (tmp_path / "o").exists()


def test_a_full_disk_during_a_checkpoint_write_names_the_folder_and_keeps_the_last_one(tmp_path, capsys,
                                                                                        monkeypatch):
    from diffusion_shortcuts import checkpoints

    out, writes, real = tmp_path / "o", [0], torch.save

    def fills_up(state, path, *args, **kwargs):
        writes[0] += 1
        if writes[0] == 2:  # the second checkpoint: torch's writer meets a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1364")
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", fills_up)
    code, line, err = run([*TRAIN["finetune"], "--out", out], capsys)
    assert code == 1 and "Traceback" not in err
    assert line.endswith(f"no space left on the device at {out} while writing finetune_checkpoint.pt (the one there "
                         f"before is kept); the last checkpoint is {out / 'finetune_checkpoint.pt'}: run the same "
                         "command with --resume to continue")
    assert load_checkpoint(out / "finetune_checkpoint.pt")["iteration"] == 1
    assert not list(out.glob(".*.tmp"))


def test_a_search_resumed_onto_another_adapter_is_refused_naming_it(tmp_path, capsys):
    """The adapter on the denoiser (its weights' fingerprint) is a setting of the search like any other; metrics.json
    names the --lora a search ran on."""
    from diffusion_shortcuts.optimize import add_lora, save_lora

    tuned = ds.zoo.load("digits-dit").model
    add_lora(tuned, rank=2, seed=0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    adapter = save_lora(tuned, tmp_path / "adapter.safetensors")
    out = tmp_path / "run"
    code, _, err = run([*TRAIN["prune"], "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["lora"] is None
    code, line, err = run([*TRAIN["prune"], "--lora", adapter, "--resume", "--out", out], capsys)
    assert code == 2 and "other settings (adapter: checkpoint '', this run '" in line, err
    code, _, err = run([*TRAIN["prune"], "--lora", adapter, "--out", tmp_path / "tuned"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["lora"] == str(adapter) and len(metrics["search_settings"]["adapter"]) == 16


def test_a_comparison_on_one_sample_leaves_fid_out_and_says_so(tmp_path, capsys):
    code, _, err = run([*TRAIN["prune"], "--samples", "1", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "fid_full" not in metrics and "fid_pruned" not in metrics and metrics["fid_features"] is None
    assert metrics["fid_left_out"] == "FID needs at least 2 samples, --samples is 1" and "FID needs" in err
    assert 0.0 <= metrics["accuracy_full"] <= 1.0 and 0.0 < metrics["ssim"] <= 1.0
    with pytest.raises(ValueError, match="needs at least 2 samples on each side .* got 1 and 5"):
        frechet_distance(torch.zeros(1, 3), torch.randn(5, 3))


@pytest.fixture
def ctrl_c_delivered():
    """Python's own Ctrl-C handler for the test, in this process and its children: a suite started in the background
    of a non-interactive shell inherits SIGINT ignored, and a command that runs there rightly ignores it too."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_while_the_command_starts_is_one_line_without_a_traceback(tmp_path, ctrl_c_delivered):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).with_name("diffusion-shortcuts")  # the installed command, as a user runs it
    command = [str(script)] if script.exists() else \
        [sys.executable, "-c", "import sys; from diffusion_shortcuts.cli import main; sys.exit(main())"]
    proc = subprocess.Popen([*command, "sample", "--model", "digits-dit", "--out", str(tmp_path / "o")], env=env,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch and diffusers takes seconds: the signal lands inside
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(err.strip().split("\n")) == 1 and "interrupted" in err


def test_ctrl_c_swallowed_by_a_library_while_loading_still_stops_the_command(tmp_path, capsys, monkeypatch,
                                                                           ctrl_c_delivered):
    """A library's bare ``except:`` around an import catches the KeyboardInterrupt; the command still stops."""
    from diffusion_shortcuts import reports

    loaded = reports.subject_from

    def loading_that_swallows_ctrl_c(flags):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler runs here
        except BaseException:  # noqa: BLE001 - the library's, not ours
            pass
        return loaded(flags)

    monkeypatch.setattr(reports, "subject_from", loading_that_swallows_ctrl_c)
    code, line, err = run(["sample", "--model", "digits-dit", "--n", "2", "--steps", "2", "--out", tmp_path / "o"],
                          capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "grid.png").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command put Python's handler back


def interrupted_sample(tmp_path, capsys, monkeypatch) -> int:
    """One ``sample`` call stopped by a Ctrl-C that a library swallowed while loading (Python's own handler)."""
    from diffusion_shortcuts import reports

    loaded, before = reports.subject_from, signal.signal(signal.SIGINT, signal.default_int_handler)

    def loading_that_swallows_ctrl_c(flags):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        except BaseException:  # noqa: BLE001 - the library's, not ours
            pass
        return loaded(flags)

    monkeypatch.setattr(reports, "subject_from", loading_that_swallows_ctrl_c)
    try:
        code, _, _ = run(["sample", "--model", "digits-dit", "--n", "1", "--steps", "1", "--out", tmp_path / "i"],
                         capsys)
    finally:
        monkeypatch.setattr(reports, "subject_from", loaded)
        signal.signal(signal.SIGINT, before)
    return code


def test_a_ctrl_c_of_one_call_does_not_stop_the_next_where_sigint_is_ignored_or_in_a_thread(tmp_path, capsys,
                                                                                         monkeypatch):
    """After an interrupted call, the next one runs: under SIGINT ignored (a background job, many CI runners), where
    the host handles it, and in a worker thread (none of which install the command's own handler)."""
    import threading

    assert interrupted_sample(tmp_path, capsys, monkeypatch) == 130
    sample = ["sample", "--model", "digits-dit", "--n", "1", "--steps", "1", "--out"]
    for handler in (signal.SIG_IGN, lambda signum, frame: None):
        before = signal.signal(signal.SIGINT, handler)
        try:
            code, line, err = run([*sample, tmp_path / f"next-{len(list(tmp_path.iterdir()))}"], capsys)
        finally:
            signal.signal(signal.SIGINT, before)
        assert code == 0, err
    codes = []
    worker = threading.Thread(target=lambda: codes.append(cli.main([*sample, str(tmp_path / "thread")])))
    worker.start()
    worker.join(timeout=120)
    assert codes == [0] and (tmp_path / "thread" / "metrics.json").exists()


# ---- smaller bad inputs -----------------------------------------------------------------------------------

@pytest.fixture
def schedule_file(tmp_path):
    m = ds.zoo.load("digits-dit")
    return m.cache_schedule(0.8).save(tmp_path / "s.json")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(reuse=[v for row in d["reuse"] for v in row]), "reuse must be a table"),
    (lambda d: d["reuse"][3].pop(), "the reuse table has 50 rows of"),
    (lambda d: d["reuse"][3].__setitem__(0, "str"), r"reuse entries must be 0/1 \(false/true\), found \['str'\]"),
    (lambda d: d.update(reuse="str"), "reuse must be a table"),
    (lambda d: d["timesteps"].__setitem__(2, float("nan")), "timesteps must be a list of finite numbers"),
])
def test_a_damaged_schedule_file_is_refused_naming_the_file(schedule_file, edit, message):
    data = json.loads(schedule_file.read_text())
    edit(data)
    schedule_file.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match=f"^{schedule_file}: {message}"):
        CacheSchedule.load(schedule_file)


def test_float64_latents_and_an_uncond_that_does_not_fit_are_refused():
    m = ds.zoo.load("digits-dit")
    sampler = m.sampler(3)
    cond = m.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="latents are float64: pass float32 latents"):
        sampler(m.noise(2, torch.Generator().manual_seed(0)).double(), cond)
    with pytest.raises(ValueError, match=r"uncond: has batch 3 but latents have batch 2 \(one row is broadcast\)"):
        sampler(m.noise(2, torch.Generator().manual_seed(0)), cond, uncond=m.encode(torch.tensor([10, 10, 10])))
