"""L_P, UMH's perceptual loss (paper 000, Eq. 5): L1 between frozen 3D feature maps of an
image and of its decoded one-step estimate, summed over layers.

The paper's network is MedicalNet's ResNet-50. MONAI fetches it from the hub at run time
(``PerceptualLoss(network_type="medicalnet_*")`` calls ``torch.hub.load``), which cannot run
offline, and no wheel ships its weights (design notes §0). So ``perceptual`` names the
backend:

- ``deepbet``: the first three blocks (``init``, ``down0``, ``down1``) of deepbet's shipped
  ``bbox_model.pt``, a TorchScript 3D LinkNet trained for T1w brain extraction (MIT, a pinned
  dependency), frozen; the default for T1w, the contrast it was trained on.
- ``medicalnet:FILE``: MONAI's ``resnet50(shortcut_type="B", bias_downsample=False)`` with
  MedicalNet weights from a local file (a ``state_dict``-wrapped, ``module.``-prefixed
  checkpoint as MedicalNet publishes it is unwrapped); features after the stem, ``layer1`` and
  ``layer2`` (the paper names no layers; deeper ones are 1/16 of the grid and add little on a
  2 mm brain box).
- ``none``: no L_P (the default for other sequences).

The layer weights lambda_l are not stated: each layer's mean L1 counts once. Inputs are
standardised by the reference image's mean and std (deepbet's own input normalisation is a
per-volume z-score), the same constants for both images, so a global intensity difference
still shows in the features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bids_harmony.errors import UsageError

PERCEPTUAL_BACKENDS = ("deepbet", "medicalnet", "none")
DEEPBET_BLOCKS = ("init", "down0", "down1")
MEDICALNET_LAYERS = ("stem", "layer1", "layer2")
STD_FLOOR = 1e-6


def parse_perceptual(spec: str) -> tuple[str, Path | None]:
    """``deepbet`` | ``none`` | ``medicalnet:FILE`` as (backend, file); a one-line UsageError
    otherwise."""
    backend, _, rest = spec.partition(":")
    if backend not in PERCEPTUAL_BACKENDS:
        raise UsageError(f"perceptual must be one of deepbet, none or medicalnet:FILE, got "
                         f"{spec!r}")
    if backend == "medicalnet":
        if not rest:
            raise UsageError("perceptual=medicalnet needs the weights file: medicalnet:FILE")
        path = Path(rest).expanduser()
        if not path.is_file():
            raise UsageError(f"perceptual weights file {path} does not exist; pass the "
                             "MedicalNet ResNet-50 checkpoint (resnet_50_23dataset.pth)")
        return backend, path
    if rest:
        raise UsageError(f"perceptual={backend} takes no file, got {spec!r}")
    return backend, None


def deepbet_model_file() -> Path:
    """deepbet's shipped bounding-box network (installed with the package, no download)."""
    import deepbet

    return Path(deepbet.__file__).resolve().parent.parent / "data" / "models" / "bbox_model.pt"


class DeepbetFeatures(nn.Module):
    """Frozen feature maps of deepbet's first blocks; its TorchScript blocks take the
    activation module as their first argument."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu")
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for name in DEEPBET_BLOCKS:
            x = getattr(self.model, name)(self.activation, x)
            features.append(x)
        return features


class MedicalNetFeatures(nn.Module):
    """Frozen feature maps of MedicalNet's ResNet-50 (stem, layer1, layer2)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        from monai.networks.nets import resnet50

        self.net = resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B",
                            bias_downsample=False, feed_forward=False)
        missing = self.net.load_state_dict(medicalnet_state(path), strict=False).missing_keys
        if missing:
            raise UsageError(f"{path} lacks ResNet-50 weights ({', '.join(missing[:3])}, ...); "
                             "pass MedicalNet's resnet_50 checkpoint")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        stem = net.act(net.bn1(net.conv1(x)))
        layer1 = net.layer1(net.maxpool(stem))
        return [stem, layer1, net.layer2(layer1)]


def medicalnet_state(path: Path) -> dict[str, torch.Tensor]:
    """A MedicalNet checkpoint's weights: unwrapped from ``state_dict`` and stripped of the
    ``module.`` prefix DataParallel saved them with; a file that holds no ResNet weights is a
    UsageError naming it."""
    checkpoint: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or "module.conv1.weight" not in checkpoint and (
            "conv1.weight" not in checkpoint):
        raise UsageError(f"{path} holds no ResNet-50 weights (no conv1.weight); pass a "
                         "MedicalNet checkpoint")
    return {name.removeprefix("module."): value for name, value in checkpoint.items()}


def build_perceptual(spec: str, device: torch.device) -> nn.Module | None:
    """The frozen extractor of ``spec`` on ``device`` (None for ``none``): eval mode, no
    parameter requires grad, differentiable with respect to its input."""
    backend, path = parse_perceptual(spec)
    if backend == "none":
        return None
    extractor = DeepbetFeatures(deepbet_model_file()) if backend == "deepbet" else (
        MedicalNetFeatures(path))  # type: ignore[arg-type]
    extractor = extractor.to(device).eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    return extractor


def describe_perceptual(spec: str) -> dict[str, str]:
    """What the model card says of L_P's network: the backend, its file and SHA-256."""
    backend, path = parse_perceptual(spec)
    if backend == "none":
        return {"backend": "none"}
    path = deepbet_model_file() if backend == "deepbet" else path
    assert path is not None
    layers = DEEPBET_BLOCKS if backend == "deepbet" else MEDICALNET_LAYERS
    return {"backend": backend, "file": str(path), "layers": ", ".join(layers),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def perceptual_loss(extractor: nn.Module, reference: torch.Tensor, estimate: torch.Tensor
                    ) -> torch.Tensor:
    """sum_l mean |psi_l(reference) - psi_l(estimate)|, both standardised by the reference's
    mean and std; the reference's features carry no gradient."""
    mean = reference.mean()
    std = reference.std().clamp_min(STD_FLOOR)
    with torch.no_grad():
        wanted = extractor((reference - mean) / std)
    got = extractor((estimate - mean) / std)
    return sum((torch.mean(torch.abs(a - b)) for a, b in zip(wanted, got)),
               torch.zeros((), device=estimate.device))
