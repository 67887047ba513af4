"""Similarity measures (SSIM and its terms, PSNR, PCC/NCC, Wasserstein) and per-image QC."""

from bids_harmony.metrics.qc import harmonization_qc
from bids_harmony.metrics.similarity import (
    ncc,
    pearson,
    psnr,
    ssim,
    ssim_components,
    wasserstein,
)

__all__ = [
    "harmonization_qc",
    "ncc",
    "pearson",
    "psnr",
    "ssim",
    "ssim_components",
    "wasserstein",
]
