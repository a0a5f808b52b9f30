"""Image denoising against scikit-learn's dictionary-learning example and scikit-image's wavelets.

The protocol of scikit-learn's image-denoising example: a grey image in [0, 1]
(downsampled by 2), a dictionary of 50 atoms learned on 7x7 patches (means
removed) of the clean left half, Gaussian noise added to the right half, which
is reconstructed from its overlapping patches. Lines:

- ``pyro_esc``: :func:`pyro_esc.denoising.learn_dictionary` (its default: 24 latents, half the
  pixels of a 7x7 patch; EM) on the clean half, then :func:`pyro_esc.denoise` of the noisy half
  (posterior means; lambda and sigma^2 fitted to the noisy patches, so the noise level is learned,
  never given);
- ``pyro_esc, blind``: the dictionary learned on the noisy half itself;
- ``pyro_esc, blind, whole image``: the whole image noisy and denoised end to end, dictionary
  learned from it (what ``pyro-esc denoise`` does); its PSNR is over the whole image;
- scikit-learn's ``MiniBatchDictionaryLearning`` (the example's settings and preprocessing:
  per-pixel means removed, per-pixel scaling for learning) with the example's four
  reconstructions: OMP with 1 and 2 atoms, LARS with 5, thresholding (rescaled to [0, 1] as
  the example does);
- scikit-image's ``denoise_wavelet`` (BayesShrink, which estimates the noise itself; needs
  PyWavelets, ``pip install -e '.[baselines]'`` in a checkout, else the line is skipped).

PSNR and SSIM (data range 1) of the right half, one core; seconds per line, learning included
(scikit-learn's: the example's dictionary learning and its transform). Run:

    python benchmarks/denoising.py [--image camera] [--sigmas 0.05 0.1 0.2] [--steps S] [--latents H]
"""

import argparse
import time

import numpy as np
import torch

from pyro_esc.data.images import cached_image
from pyro_esc.denoising import denoise, learn_dictionary


def sklearn_lines(clean_half, noisy, seed):
    """The example's own steps: per-pixel means removed (and, for learning, per-pixel scaling)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

    started = time.perf_counter()
    data = extract_patches_2d(clean_half, (7, 7)).reshape(-1, 49)
    data = data - data.mean(0)
    data /= data.std(0)
    learner = MiniBatchDictionaryLearning(n_components=50, batch_size=200, alpha=1.0, max_iter=1,
                                          random_state=seed).fit(data)
    learn_time = time.perf_counter() - started
    patches = extract_patches_2d(noisy, (7, 7)).reshape(-1, 49)
    intercept = patches.mean(0)
    out = {}
    for name, options in [("OMP, 1 atom", dict(transform_algorithm="omp", transform_n_nonzero_coefs=1)),
                          ("OMP, 2 atoms", dict(transform_algorithm="omp", transform_n_nonzero_coefs=2)),
                          ("LARS, 5 atoms", dict(transform_algorithm="lars", transform_n_nonzero_coefs=5)),
                          ("thresholding", dict(transform_algorithm="threshold", transform_alpha=0.1))]:
        started = time.perf_counter()
        learner.set_params(**options)
        reconstruction = learner.transform(patches - intercept) @ learner.components_ + intercept
        if name == "thresholding":  # the example rescales the thresholded reconstruction to [0, 1]
            reconstruction -= reconstruction.min()
            reconstruction /= reconstruction.max()
        image = reconstruct_from_patches_2d(reconstruction.reshape(-1, 7, 7), noisy.shape)
        out[f"scikit-learn {name}"] = (image, learn_time + time.perf_counter() - started)
    return out


def score(clean, estimate):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    estimate = np.clip(estimate, 0, 1)
    return (peak_signal_noise_ratio(clean, estimate, data_range=1.0),
            structural_similarity(clean, estimate, data_range=1.0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="camera", help="bundled grey image (default camera)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--steps", type=int, default=None, help="EM step limit of each pyro_esc fit (default: "
                                                                 "denoise's)")
    parser.add_argument("--latents", type=int, default=None, help="pyro_esc's dictionary size (default: "
                                                                   "learn_dictionary's, half a patch's pixels)")
    parser.add_argument("--max-patches", type=int, default=10000, help="patches to learn a dictionary from")
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--no-blind", action="store_true", help="skip the blind pyro_esc line")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from skimage.restoration import denoise_wavelet

    image = cached_image(args.image)[::args.downsample, ::args.downsample]
    width = image.shape[1]
    clean_half, right = image[:, :width // 2], image[:, width // 2:]
    start = time.perf_counter()
    model = learn_dictionary(clean_half, 7, args.latents, max_patches=args.max_patches, steps=args.steps)
    learn_time = time.perf_counter() - start
    rows = {}
    for sigma in args.sigmas:
        noisy = right + sigma * np.random.default_rng(0).standard_normal(right.shape)
        lines = {"noisy": (noisy, None, None)}
        start = time.perf_counter()
        ours = denoise(noisy, 7, model=model, steps=args.steps)
        lines["pyro_esc"] = (ours.image, ours.noise_std, time.perf_counter() - start + learn_time)
        if not args.no_blind:
            start = time.perf_counter()
            blind = denoise(noisy, 7, n_latents=args.latents, max_patches=args.max_patches, steps=args.steps)
            lines["pyro_esc, blind"] = (blind.image, blind.noise_std, time.perf_counter() - start)
        for name, (estimate, seconds) in sklearn_lines(clean_half, noisy, 0).items():
            lines[name] = (estimate, None, seconds)
        try:  # needs PyWavelets (pip install -e '.[baselines]')
            lines["scikit-image wavelet (BayesShrink)"] = (denoise_wavelet(noisy, method="BayesShrink", mode="soft",
                                                                           rescale_sigma=True), None, None)
        except ImportError as error:
            print(f"wavelet line skipped: {error}")
        rows[sigma] = {name: score(right, estimate) + (noise, seconds)
                       for name, (estimate, noise, seconds) in lines.items()}
        if not args.no_blind:
            whole = image + sigma * np.random.default_rng(1).standard_normal(image.shape)
            start = time.perf_counter()
            result = denoise(whole, 7, n_latents=args.latents, max_patches=args.max_patches, steps=args.steps)
            seconds = time.perf_counter() - start
            rows[sigma][f"pyro_esc, blind, whole image ({image.shape[0]}x{image.shape[1]})"] = (
                score(image, result.image) + (result.noise_std, seconds))
        print(f"\nsigma = {sigma} ({args.image}, {image.shape[0]}x{image.shape[1]}, right half denoised)")
        reference = rows[sigma]["scikit-learn OMP, 2 atoms"][3]
        print("| method | PSNR (dB) | SSIM | learned noise sigma | time (s) | time / scikit-learn OMP-2 |")
        print("|---|---|---|---|---|---|")
        for name, (value_psnr, value_ssim, noise, seconds) in rows[sigma].items():
            print(f"| {name} | {value_psnr:.2f} | {value_ssim:.3f} | {'-' if noise is None else format(noise, '.3f')} "
                  f"| {'-' if seconds is None else format(seconds, '.1f')} "
                  f"| {'-' if seconds is None else format(seconds / reference, '.1f')} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
