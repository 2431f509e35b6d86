"""CLIP rewards load a tiny random CLIP model from a local folder (no download) and are differentiable."""

import pytest
import torch

from diffusion_shortcuts.rewards.clip import Aesthetic, ClipScore, load_linear_head

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from tiny_pipelines import clip_model_folder

    return clip_model_folder(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_score_loads_locally_and_is_differentiable(clip_folder):
    reward = ClipScore(clip_folder, "a cat")
    images = torch.rand(2, 1, 16, 16, requires_grad=True)
    values = reward(images)
    assert values.shape == (2,) and (values.abs() <= 100 + 1e-4).all()
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    other = ClipScore(clip_folder, "a dog")
    assert not torch.allclose(other(images.detach()), values.detach())


def test_aesthetic_head_from_safetensors_and_errors(clip_folder, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = {"layers.0.weight": torch.randn(4, 8), "layers.0.bias": torch.randn(4),
            "layers.2.weight": torch.randn(1, 4), "layers.2.bias": torch.randn(1)}
    save_file(head, str(tmp_path / "head.safetensors"))
    reward = Aesthetic(clip_folder, tmp_path / "head.safetensors")
    images = torch.rand(3, 3, 20, 24)
    emb = reward.clip.embed(images)
    hidden = emb @ head["layers.0.weight"].T + head["layers.0.bias"]
    expected = hidden @ head["layers.2.weight"].T + head["layers.2.bias"]
    assert torch.allclose(reward(images), expected.squeeze(-1), atol=1e-5)
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="cannot read"):
        load_linear_head(tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        ClipScore(tmp_path / "missing", "x")
    save_file({"w.weight": torch.randn(1, 5)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="takes 5 features"):
        Aesthetic(clip_folder, tmp_path / "wrong.safetensors")
