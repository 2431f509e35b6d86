"""Zoo training: a killed generator run resumes from its checkpoint to the very same weights."""

import torch
from safetensors.torch import load_file

from diffusion_shortcuts.zoo import train


def weights(folder):
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_resume_reaches_the_same_weights(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["digits-dit", "--out", str(straight), "--steps", "4", "--batch", "4", "--checkpoint-every", "2"])
    assert not (straight / "checkpoint.pt").exists()  # removed once the final weights are written

    real_step = torch.optim.AdamW.step
    calls = []

    def dying_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 4th step dies after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    try:
        train.main(["digits-dit", "--out", str(resumed), "--steps", "4", "--batch", "4", "--checkpoint-every", "2"])
    except KeyboardInterrupt:
        pass
    assert (resumed / "checkpoint.pt").exists()
    calls.clear()
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (calls.append(1), real_step(self, *a, **k))[1])
    train.main(["digits-dit", "--out", str(resumed), "--steps", "4", "--batch", "4", "--checkpoint-every", "2",
                "--resume"])
    assert len(calls) == 2  # it continued from step 2 rather than starting over
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
