"""Figures of sample quality and cost: accuracy, FID on a supplied feature extractor, SSIM/PSNR, MACs, timing."""

from __future__ import annotations

import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Fraction of images in [0, 1] that ``classifier`` assigns to ``labels``."""
    preds = torch.cat([classifier(images[i:i + batch].clamp(0, 1)).argmax(-1) for i in range(0, len(images), batch)])
    return (preds.cpu() == labels.cpu()).float().mean().item()


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch].clamp(0, 1)) for i in range(0, len(images), batch)]).double().cpu()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


FID_MIN_SAMPLES = 2  # a covariance needs two


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, the FID formula):
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < FID_MIN_SAMPLES:
        raise ValueError(f"the Fréchet distance needs at least {FID_MIN_SAMPLES} samples on each side (a covariance), "
                         f"got {len(feats_a)} and {len(feats_b)}")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004) with a Gaussian window; differentiable. Shape (B,). Videos
    ``(B, C, F, H, W)``: the mean of their frames' SSIM."""
    if a.shape != b.shape or a.ndim not in (4, 5):
        raise ValueError(f"ssim needs two (B, C, H, W) images or (B, C, F, H, W) videos of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 5:
        frames = a.shape[2]
        per_frame = ssim(*(v.transpose(1, 2).flatten(0, 1) for v in (a, b)), window, sigma, data_range)
        return per_frame.view(-1, frames).mean(1)
    c = a.shape[1]
    w = _gaussian_window(min(window, a.shape[-1]), sigma, c, a.device, a.dtype)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image, shape (B,). Videos ``(B, C, F, H, W)``: the mean of their frames' PSNR."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 5:
        return frame_psnr(a, b, data_range).mean(1)
    mse = (a - b).flatten(1).square().mean(1).clamp(min=1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def _check_videos(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"{name} needs two (B, C, F, H, W) videos of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B * F, C, H, W), the frames of each video in order."""
    return video.transpose(1, 2).flatten(0, 1)


def frame_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame of two batches of videos, shape (B, F)."""
    _check_videos("frame_ssim", a, b)
    return ssim(_frames(a), _frames(b)).view(a.shape[0], a.shape[2])


def frame_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each frame of two batches of videos, shape (B, F)."""
    _check_videos("frame_psnr", a, b)
    return psnr(_frames(a), _frames(b), data_range).view(a.shape[0], a.shape[2])


def temporal_error(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How differently a video moves from its reference, per video (B,): the mean absolute difference of their
    frame-to-frame changes, ``mean |(v[f+1] - v[f]) - (r[f+1] - r[f])|``, in the pixels' units. 0 when the video
    changes from frame to frame exactly as the reference does, whatever each frame's own error (which SSIM and PSNR
    measure); a cache that freezes or jitters frames raises it."""
    _check_videos("temporal_error", video, reference)
    if video.shape[2] < 2:
        raise ValueError(f"temporal_error needs videos of at least 2 frames, got {video.shape[2]}")
    change, reference_change = video.diff(dim=2), reference.diff(dim=2)
    return (change - reference_change).abs().flatten(1).mean(1)


def latent_distance(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The relative squared distance of final latents to a reference's, per sample (B,): ``|z - z_ref|^2 /
    |z_ref|^2``; no decode, so the same figure for images and videos, and the search's ``latent`` objective."""
    if latents.shape != reference.shape:
        raise ValueError(f"latent_distance needs two tensors of one shape, got {tuple(latents.shape)} and "
                         f"{tuple(reference.shape)}")
    return (latents - reference).flatten(1).square().sum(1) / reference.flatten(1).square().sum(1).clamp_min(1e-12)


def quality_to(samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """What a schedule (or any change) keeps of a reference's samples, as figures: mean SSIM and PSNR (of the frames,
    for videos), and for videos the per-frame SSIM (the mean over the batch, frame by frame) and the temporal error."""
    figures = {"ssim": float(ssim(samples, reference).mean()), "psnr": float(psnr(samples, reference).mean())}
    if samples.ndim == 5:
        figures["ssim_per_frame"] = [round(float(v), 5) for v in frame_ssim(samples, reference).mean(0)]
        if samples.shape[2] > 1:
            figures["temporal_error"] = float(temporal_error(samples, reference).mean())
    return figures


@torch.library.custom_op("diffusion_shortcuts::attention", mutates_args=())
def _counted_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                       dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """``scaled_dot_product_attention`` as one opaque op, so that counting it does not depend on which kernel
    (fused on CPU and GPU, decomposed into matrix products on the meta device) torch would pick."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@_counted_attention.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


class _OpaqueAttention(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            params = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                              args))
            params.update(kwargs)
            return _counted_attention(params["query"], params["key"], params["value"], params.get("attn_mask"),
                                      float(params.get("dropout_p", 0.0)), bool(params.get("is_causal", False)),
                                      params.get("scale"), bool(params.get("enable_gqa", False)))
        return func(*args, **kwargs)


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q K^T) V: two batched matrix products, 2 FLOPs per multiply-accumulate."""
    *batch, s_q, d = query
    return 2 * int(torch.tensor(batch).prod()) * s_q * key[-2] * (d + value[-1])


def count_macs(fn, *args, attention: bool = True, **kwargs) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of ``fn(*args, **kwargs)``: the total and per module path.

    Counted by torch's ``FlopCounterMode`` (matmuls, convolutions; elementwise ops are free), halved to
    MACs. Module paths are as the counter names them: ``"UNet2DConditionModel.down_blocks.0"``. Works on
    models on the meta device too (shapes only). ``attention``: count the two matrix products inside
    ``scaled_dot_product_attention`` (Q K^T and the product with V), the full cost; with ``False`` they
    are left out, which is how DiP-GO's published MACs table was counted (the "paper-compatible" figure).
    """
    formula = _attention_flops if attention else (lambda *a, out_shape=None, **k: 0)
    mapping = {torch.ops.diffusion_shortcuts.attention: formula}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, _OpaqueAttention(), torch.no_grad():
        fn(*args, **kwargs)
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def timed_pair(run_a, run_b, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of two callables timed alternately (a, b, a, b, ...) after one warm-up round each,
    so that both see the same machine load; the ratio of the two is the figure to report."""
    import statistics

    times_a, times_b = [], []
    for r in range(repeats + 1):
        with Timer() as ta:
            run_a()
        with Timer() as tb:
            run_b()
        if r:
            times_a.append(ta.seconds)
            times_b.append(tb.seconds)
    return statistics.median(times_a), statistics.median(times_b)


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MB (Linux reports KB): CPU peak memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """The high-water mark of memory in MB: CUDA's allocator on a GPU, this process's resident memory on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def diversity(images: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean pairwise root-mean-square pixel distance between images of the same group, averaged over the
    groups with at least two images: how different the samples of one condition are. It falls toward 0
    when fine-tuning collapses a condition onto one image (reward hacking)."""
    if len(images) != len(groups):
        raise ValueError(f"diversity: {len(images)} images but {len(groups)} group ids")
    flat = images.flatten(1).double()
    per_group = [torch.pdist(flat[groups == g]).mean() / flat.shape[1] ** 0.5
                 for g in groups.unique() if int((groups == g).sum()) >= 2]
    if not per_group:
        raise ValueError("diversity: no group has two images")
    return float(torch.stack(per_group).mean())
