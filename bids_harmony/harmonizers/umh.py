"""UMH: unpaired multi-site harmonization by style-guided latent diffusion (paper 000).

Stage 0 trains a 3D KL autoencoder (:mod:`bids_harmony.nn.autoencoder`) on random crops of
every training image. Stage 1, the coarse harmonizer, trains a conditional latent diffusion
model on the scaled latents: the noisy latent with IN(Z0), the clean latent's instance
normalisation, as condition, loss L_N + L_G + L_P with the gradient and perceptual losses
(:mod:`bids_harmony.nn.perceptual`) on the decoded one-step estimate. Forward noising and
reverse DDIM map any image into the unified domain (``--target-site unified`` stops here).
Stage 2, the fine harmonizer, re-encodes the unified images, inverts them with the stage-1
model's own noise and fine-tunes a copy of it so that Psi's style vectors of the decoded
translations match the target's: SGCD's stage 2 in latent space, on the same DDIM core
(:mod:`bids_harmony.nn.ddim`), style losses and Psi backends (:mod:`bids_harmony.nn.style`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bids_harmony.errors import NotFittedError, UsageError
from bids_harmony.harmonizers.base import UNIFIED, FittedState, TrainingSet
from bids_harmony.harmonizers.learned import (
    LOSS_HISTORY,
    BrainBox,
    LearnedHarmonizer,
    between_site_wd,
    machine_preset,
    module_arrays,
    module_state,
    monitor_arrays,
    pad_end,
    padded_shape,
    plot_loss_curve,
    resolve_settings,
    summarise_losses,
)
from bids_harmony.harmonizers.registry import register
from bids_harmony.metrics.similarity import psnr, ssim, wasserstein
from bids_harmony.nn import TrainingState, checkpoint_path, distributed, fingerprint, train_state
from bids_harmony.nn.autoencoder import (
    SampledReconstruction,
    autoencoder_loss,
    build_autoencoder,
    decode,
    decode_block,
    downsampling,
    encode,
    instance_normalise,
    latent_scale,
    latent_shape,
    random_corner,
)
from bids_harmony.nn.ddim import (
    BETA_SCHEDULES,
    TRAINING_STEPS,
    add_noise,
    alphas_cumprod,
    estimate_clean,
    invert,
    reverse,
    reverse_last_k,
    timestep_grid,
)
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.diffusion_unet import ConditionalDiffusionUNet, eps_function
from bids_harmony.nn.histogram import gradient_map, gradient_scale
from bids_harmony.nn.perceptual import (
    build_perceptual,
    describe_perceptual,
    parse_perceptual,
    perceptual_loss,
)
from bids_harmony.nn.style import (
    DESCRIPTION_KEY as PSI_DESCRIPTION,
    load_style_encoder,
    parse_psi,
    stage_description,
    style_encoder_stage,
    style_updates,
    style_vector,
)
from bids_harmony.nn.training import warmup_schedule
from bids_harmony.volume import Volume

LOGGER = logging.getLogger(__name__)

#: State-array prefixes: the autoencoder, the stage-1 network, the fine-tuned one.
AUTOENCODER, STAGE1, STAGE2 = "autoencoder.", "stage1.", "stage2."
SCALE_FACTOR = "scale_factor"
CLASS_LABEL = "class_label"
AE_LOSS_HISTORY = "autoencoder_loss_history"
STAGE2_LOSS_HISTORY = "stage2_loss_history"
PERCEPTUAL = "perceptual"
#: Settings that change no stage's weights (left out of the fingerprints).
NOT_IN_FINGERPRINT = ("device", "checkpoint_every", "inference_t_stop")
#: Diagnostics: the autoencoder's reconstruction PSNR on training images, the between-site WD
#: before / after stage 1, the WD of source-site images to the target before / after stage 2.
AE_PSNR = "autoencoder_psnr"
SITE_WD_SOURCE, SITE_WD_UNIFIED = "site_wd_source", "site_wd_unified"
TARGET_WD_SOURCE, TARGET_WD_HARMONIZED = "target_wd_source", "target_wd_harmonized"
#: Below this reconstruction PSNR (dB, brain voxels) no translation can be sharper than the
#: autoencoder lets it, and the source itself is 19.8-24.6 dB from its target on IXI heads.
LOW_RECONSTRUCTION_DB = 25.0
TRAINED_PSI = ("style-contrastive", "site-contrastive")
DIAGNOSTIC_IMAGES_PER_SITE = 2
#: ``perceptual=auto``: deepbet's T1w-trained features for T1w images, none for the rest.
AUTO = "auto"
T1W = "T1w"


@dataclass(frozen=True)
class UMHSettings:
    """Everything that defines a UMH model. Defaults are the paper's where it gives one.

    Stage 0, the autoencoder: MONAI ``AutoencoderKL`` with ``ae_channels`` per level (a 2x
    downsampling between levels), ``latent_channels``, ``ae_res_blocks`` per level, trained
    ``ae_steps`` Adam steps at ``ae_learning_rate`` (``ae_decay``: ``none`` or ``cosine`` to 0)
    on ``ae_batch`` random ``ae_crop``^3
    crops (0: the whole box); loss L1 + ``kl_weight`` KL, plus HCLD's options
    ``ae_perceptual_weight`` (L_P's network on the crop) and ``ae_adversarial_weight``
    (LSGAN with MONAI's 3-layer ``PatchDiscriminator``, its lr ``5 * ae_learning_rate``).

    Stage 1, the coarse harmonizer: MONAI ``DiffusionModelUNet`` ``channels`` per level,
    attention at ``attention_levels``, ``res_blocks``, GroupNorm ``norm_groups``,
    ``head_channels``, behind a ``space_to_channel`` rearrangement of the latent (1: none);
    ``stage1_steps`` Adam steps at ``learning_rate`` on one latent per
    step (warm-up ``warmup_steps``, clipping ``clip_norm``, 0: off); t uniform in
    1 .. ``t_max``; weights ``weight_noise``, ``weight_gradient``, ``weight_perceptual``;
    L_G and L_P on a decoded latent block of side ``decode_block`` (0: the whole latent)
    with ``decode_halo`` latent voxels of context; ``perceptual``: ``auto``, ``deepbet``,
    ``medicalnet:FILE`` or ``none``. Schedule ``beta_schedule`` 0.0015 -> 0.0195, T = 1000.

    Inference and stage 2: noising to ``t_stop`` and ``reverse_steps`` (T_r) DDIM steps;
    stage 2 inverts in ``inversion_steps`` (T_f); ``inference_t_stop`` (0: the trained one)
    changes only the depth at transform. Stage 2: ``stage2_epochs`` draws per source-site
    image at ``stage2_learning_rate``, gradients through the last ``last_k`` reverse steps,
    Psi ``psi`` trained ``psi_steps`` steps where it learns.
    """

    ae_channels: tuple[int, ...]
    latent_channels: int
    ae_res_blocks: int
    ae_steps: int
    ae_crop: int
    channels: tuple[int, ...]
    attention_levels: tuple[int, ...]
    res_blocks: int
    norm_groups: int
    head_channels: int
    stage1_steps: int
    space_to_channel: int = 1
    ae_batch: int = 2
    ae_learning_rate: float = 1e-4
    ae_decay: str = "none"
    kl_weight: float = 1e-6
    ae_perceptual_weight: float = 0.0
    ae_adversarial_weight: float = 0.0
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    clip_norm: float = 0.0
    beta_schedule: str = "linear"
    t_max: int = 1000
    weight_noise: float = 1.0
    weight_gradient: float = 1.0
    weight_perceptual: float = 1.0
    perceptual: str = "auto"
    decode_block: int = 0
    decode_halo: int = 4
    t_stop: int = 250
    inversion_steps: int = 25
    reverse_steps: int = 30
    inference_t_stop: int = 0
    stage2_epochs: int = 30
    stage2_learning_rate: float = 1e-5
    last_k: int = 10
    psi: str = "style-contrastive"
    psi_steps: int = 300
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100


#: ``tiny``: tests, seconds on phantoms. ``cpu``: the default without a GPU, on the 2 mm brain
#: box: a (16, 32) autoencoder with 4 latent channels (2x per axis) on 48^3 crops, since a 4x
#: one, (16, 32, 32), reconstructed held-out brains at only 19 dB after 250 steps where this
#: one reached 23.6 dB in 150 (benchmarks/results/umh.md); the U-Net (32, 64, 64) behind
#: 2x2x2 space-to-channel (SGCD's cpu net, on the same 20x24x24 grid), L_G and L_P on 16^3
#: latent blocks (32^3 voxels); t up to 250 in training and t_stop 100 at inference as in
#: SGCD's cpu preset; stage 2 at lr 1e-4. ``fast``: HCLD's sizes (the paper's stated
#: 3.3 M + 3.0 M parameters) on one GPU. ``paper``: the paper's text: autoencoder
#: {32, 64, 128} with 2 res blocks, U-Net {32, 64, 64, 64} with 2 res blocks and attention,
#: T_f / T_r = 25 / 30 (the two disagree with the stated parameter counts; design notes §1.1).
PRESETS: dict[str, UMHSettings] = {
    "tiny": UMHSettings((8, 8), 2, 1, 10, 16, (16, 16), (1,), 1, 8, 8, 10,
                        ae_learning_rate=1e-3, learning_rate=1e-3, t_max=250, t_stop=30,
                        decode_block=4, decode_halo=2, inversion_steps=3, reverse_steps=3,
                        stage2_epochs=1, stage2_learning_rate=1e-4, last_k=1,
                        psi="random-gram", psi_steps=0, checkpoint_every=5),
    "cpu": UMHSettings((16, 32), 4, 1, 600, 48, (32, 64, 64), (2,), 1, 16, 32, 500,
                       space_to_channel=2, ae_learning_rate=1e-3, ae_decay="cosine",
                       learning_rate=5e-4,
                       warmup_steps=50, clip_norm=1.0, t_max=250, decode_block=16,
                       t_stop=100, inversion_steps=8, reverse_steps=8, stage2_epochs=4,
                       stage2_learning_rate=1e-4, last_k=2, psi_steps=200),
    "fast": UMHSettings((32, 64, 64), 6, 1, 20_000, 64, (32, 64, 64), (1, 2), 1, 16, 64,
                        20_000, warmup_steps=500, clip_norm=1.0, t_max=500, t_stop=100,
                        stage2_epochs=10, last_k=5, psi_steps=2000),
    "paper": UMHSettings((32, 64, 128), 6, 2, 60_000, 64, (32, 64, 64, 64), (1, 2, 3), 2, 16,
                         32, 60_000, psi_steps=2000),
}
#: Measured seconds per step (autoencoder + stage 1) on 2 CPU cores, for the announcement.
CPU_SECONDS_PER_STEP = {"cpu": 1.2, "tiny": 0.05}


@register("umh")
class UMH(LearnedHarmonizer):
    """UMH: an autoencoder, one latent diffusion model for every site and sequence mapping to
    a unified domain, fine-tuned to a target site with a style-vector loss.

    Choices the paper leaves open:

    * The autoencoder's losses and budget are HCLD's (L1 + 1e-6 KL; perceptual 0.1 and
      adversarial 0.01 as options). Its GroupNorms are per-channel affines and it has no
      attention, so it is fully convolutional (:mod:`bids_harmony.nn.autoencoder`). Images
      enter as ``2 * data - 1`` on the training masks' brain box (background -1), padded at
      the end to the nets' divisor. The latent is the encoder's mean, times
      ``scale_factor`` = 1 / std of the training latents (HCLD).
    * IN(Z0) is concatenated to the noisy latent (HCLD's way in; the paper does not say).
      One network serves every sequence, with the sequence as class embedding (the paper
      trains T1w only; SGCD's joint fit).
    * L_G compares gradient maps (Eq. 4) of the decoded estimate and the image, both
      divided by the image's largest |gradient| (SGCD's scale); L_P sums each layer's mean
      L1 (lambda_l not stated). At ``decode_block`` > 0 both are taken on one random latent
      block, decoded with ``decode_halo`` voxels of context: the losses are local, so a block
      gives the same gradients as its region of a full decode.
    * The unified domain (Eq. 6) is forward noising with Eq. 1 to ``t_stop`` (seeded noise,
      so a transform is reproducible) and DDIM reverse diffusion; the paper's T_r counts the
      steps to ``t_stop``, whose depth it does not state.
    * Stage 2 (Eqs. 7-11): Z_X^0 = E(M_X->U) is inverted with the stage-1 model's noise
      (:func:`bids_harmony.nn.ddim.invert`), reversed with the model being tuned, and each of
      the last ``last_k`` one-step estimates is decoded for Psi and is its own update
      (SGCD's code); its lr and length are not stated.
    * Psi is a substitute unless ``psi=biomedclip:DIR`` (:mod:`bids_harmony.nn.style`).
    """

    citation = ("Wu et al., Unpaired multi-site brain MRI harmonization with image "
                "style-guided latent diffusion (UMH); no public code, predecessor MW1798/HCLD.")
    presets: ClassVar[tuple[str, ...]] = ("auto", *PRESETS)
    loss_label: ClassVar[str] = "stage-1 loss (L_N + L_G + L_P)"

    def __init__(self, preset: str = "auto", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        for name in ("ae_channels", "channels", "attention_levels"):
            if name in overrides:
                overrides[name] = tuple(int(c) for c in overrides[name])
        preset = machine_preset(preset, overrides.get("device", "auto"))
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        params = asdict(settings)
        for name in ("ae_channels", "channels", "attention_levels"):
            params[name] = list(getattr(settings, name))
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **params)

    # -- contract --------------------------------------------------------------------------
    def _fit_sequences(self, training: TrainingSet) -> FittedState:
        settings = self.settings
        device = resolve_device(settings.device)
        sequences = sorted(training.images)
        images = [im for seq in sequences for im in training.images[seq]]
        labels = [sequences.index(seq) for seq in sequences for _ in training.images[seq]]
        sites = [site for seq in sequences for site in training.sites[seq]]
        divisor = _divisor(settings)
        box = BrainBox.around([im.mask for im in images], [divisor] * 3)
        data = [prepare(box.crop(im), divisor) for im in images]
        common = {name: value for name, value in asdict(settings).items()
                  if name not in NOT_IN_FINGERPRINT}
        ae_settings = {k: v for k, v in common.items() if k in AE_FIELDS}
        if settings.ae_perceptual_weight:
            ae_settings["perceptual"] = settings.perceptual
        ae_key = fingerprint(ae_settings, [d.image for d in data])
        self._announce(settings.ae_steps + settings.stage1_steps,
                       CPU_SECONDS_PER_STEP.get(self.params["preset"]))
        ae_arrays = self._stage("autoencoder", ae_key,
                                lambda: self._train_autoencoder(data, labels, sequences,
                                                                ae_key, device))
        autoencoder = load_autoencoder(settings, ae_arrays, device)
        scale = float(ae_arrays[SCALE_FACTOR][0])
        latents = [encode_scaled(autoencoder, d.image, scale, device) for d in data]
        stage1_key = fingerprint(
            {**{k: v for k, v in common.items() if k in STAGE1_FIELDS}, "ae": ae_key,
             "sequences": sequences}, [np.array(labels)])
        stage1 = self._stage("stage1", stage1_key, lambda: self._train_stage1(
            autoencoder, scale, data, latents, labels, sequences, stage1_key, device))
        network = load_network(settings, len(sequences), stage1, STAGE1, device)
        unified_key = fingerprint({"stage1": stage1_key, "t_stop": settings.t_stop,
                                   "reverse_steps": settings.reverse_steps}, [])
        cached = self._stage("unified", unified_key, lambda: {
            f"image_{i}": unify(autoencoder, network, scale, d, z, label, settings,
                                settings.t_stop, device)
            for i, (d, z, label) in enumerate(zip(data, latents, labels))})
        unified = [cached[f"image_{i}"] for i in range(len(data))]
        shared = {**{k: v for k, v in ae_arrays.items() if k.startswith(AUTOENCODER)},
                  SCALE_FACTOR: ae_arrays[SCALE_FACTOR],
                  **{k: v for k, v in stage1.items() if k.startswith(STAGE1)},
                  **box.to_state()}
        if training.target_site != UNIFIED:
            stage2_key = fingerprint(
                {**common, "stage1": stage1_key, "target": training.target_site},
                [np.array([s == training.target_site for s in sites])])
            stage2 = self._stage("stage2", stage2_key, lambda: self._train_stage2(
                autoencoder, network, scale, data, unified, labels, sites,
                training.target_site, sequences, stage2_key, device))
            shared.update({k: v for k, v in stage2.items()
                           if k.startswith(STAGE2) or k == PSI_DESCRIPTION})
        per_sequence: dict[str, dict[str, np.ndarray]] = {}
        for k, seq in enumerate(sequences):
            own = [i for i, label in enumerate(labels) if label == k]
            history = {"step": settings.stage1_steps,
                       AE_PSNR: float(ae_arrays[f"{AE_PSNR}_{seq}"][0]),
                       SITE_WD_UNIFIED: between_site_wd(
                           [brain_values(unified[i], data[i].mask) for i in own],
                           [sites[i] for i in own])}
            baselines = {SITE_WD_SOURCE: between_site_wd(
                [brain_values(data[i].image, data[i].mask) for i in own],
                [sites[i] for i in own])}
            per_sequence[seq] = {CLASS_LABEL: np.array([k], dtype=np.int64),
                                 LOSS_HISTORY: stage1[LOSS_HISTORY],
                                 AE_LOSS_HISTORY: ae_arrays[AE_LOSS_HISTORY],
                                 PERCEPTUAL: _text_array(perceptual_spec(settings, seq))}
            if training.target_site != UNIFIED:
                before, after = stage2[f"target_wd_{seq}"]
                history[TARGET_WD_HARMONIZED] = float(after)
                baselines[TARGET_WD_SOURCE] = float(before)
                per_sequence[seq][STAGE2_LOSS_HISTORY] = stage2[STAGE2_LOSS_HISTORY]
            per_sequence[seq].update(monitor_arrays([history], baselines, held_out=False))
        return FittedState(per_sequence, shared)

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """An autoencoder that blurs, a stage 1 that does not bring the sites closer, or a
        stage 2 that does not bring source images closer to the target learned too little."""
        final, baselines = diagnostics["history"][-1], diagnostics["baselines"]
        warnings = []
        if final[AE_PSNR] < LOW_RECONSTRUCTION_DB:
            warnings.append(
                f"the autoencoder reconstructs training brains at {final[AE_PSNR]:.1f} dB "
                f"PSNR (< {LOW_RECONSTRUCTION_DB:.0f}): no output is sharper than that; "
                "train it longer (ae_steps) or on a GPU (--preset fast)")
        if final[SITE_WD_UNIFIED] >= baselines[SITE_WD_SOURCE]:
            warnings.append(
                f"stage 1 leaves the sites {final[SITE_WD_UNIFIED]:.4f} apart (WD between "
                f"sites, {diagnostics['scored_on']} images), no closer than before "
                f"({baselines[SITE_WD_SOURCE]:.4f}): the unified domain is not unified; "
                "train longer (stage1_steps) or on a GPU (--preset fast)")
        if TARGET_WD_HARMONIZED in final and final[TARGET_WD_HARMONIZED] >= baselines[
                TARGET_WD_SOURCE]:
            warnings.append(
                f"stage 2 leaves source images {final[TARGET_WD_HARMONIZED]:.4f} from the "
                f"target site (WD), no closer than un-harmonized "
                f"({baselines[TARGET_WD_SOURCE]:.4f}): it has not learned the target style")
        return warnings

    def _add_to_card(self, card: dict[str, Any], staging: Path) -> None:
        """Every stage's loss curve, the latent scale, L_P's network (with its SHA-256) and
        Psi."""
        super()._add_to_card(card, staging)
        card["scale_factor"] = float(self.shared_state_[SCALE_FACTOR][0])
        card["perceptual"], card["loss_curve_autoencoder"], card["loss_curve_stage2"] = {}, {}, {}
        for sequence, seq_state in self.state_.items():
            card["perceptual"][sequence] = describe_perceptual(_text(seq_state[PERCEPTUAL]))
            for key, name, title in ((AE_LOSS_HISTORY, "autoencoder", "L1 + KL"),
                                     (STAGE2_LOSS_HISTORY, "stage2", "style loss (L_S + L_R)")):
                if key not in seq_state:
                    continue
                steps, losses = summarise_losses(seq_state[key])
                card[f"loss_curve_{name}"][sequence] = {"step": steps, "loss": losses}
                plot_loss_curve(seq_state[key], f"UMH {name}, {sequence}", title,
                                staging / f"loss_{name}_{sequence}.png")
        if PSI_DESCRIPTION in self.shared_state_:
            card["psi"] = stage_description(self.shared_state_)

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        settings = self.settings
        device = resolve_device(settings.device)
        classes = len(self.training_["sequences"])
        label = int(state[CLASS_LABEL][0])
        box = BrainBox.from_state(state)
        crop = box.crop(image)
        data = prepare(crop, _divisor(settings))
        autoencoder = load_autoencoder(settings, state, device)
        scale = float(state[SCALE_FACTOR][0])
        t_stop = settings.inference_t_stop or settings.t_stop
        stage1 = load_network(settings, classes, state, STAGE1, device)
        latent = encode_scaled(autoencoder, data.image, scale, device)
        out = unify(autoencoder, stage1, scale, data, latent, label, settings, t_stop, device)
        if self.target_site_ != UNIFIED:
            stage2 = load_network(settings, classes, state, STAGE2, device)
            out = translate(autoencoder, stage1, stage2, scale, data, out, label, settings,
                            t_stop, device)
        out = np.clip((out + 1.0) / 2.0, 0.0, 1.0)[tuple(slice(0, n) for n in crop.data.shape)]
        return box.uncrop(np.where(crop.mask, out, 0.0).astype(np.float32))

    def reconstruct(self, image: Volume) -> np.ndarray:
        """D(E(image)) on the full grid in [0, 1], 0 outside the brain: the autoencoder's
        ceiling for ``image`` (one autoencoder serves every sequence)."""
        if not hasattr(self, "shared_state_"):
            raise NotFittedError("umh: fit the model (or load one) before reconstruct")
        state = self.shared_state_
        device = resolve_device(self.settings.device)
        box = BrainBox.from_state(state)
        crop = box.crop(image)
        data = prepare(crop, _divisor(self.settings))
        autoencoder = load_autoencoder(self.settings, state, device)
        with torch.no_grad():
            out = decode(autoencoder, encode(
                autoencoder, torch.from_numpy(data.image)[None, None].to(device)))
        out = np.clip((out[0, 0].cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
        out = out[tuple(slice(0, n) for n in crop.data.shape)]
        return box.uncrop(np.where(crop.mask, out, 0.0).astype(np.float32))

    # -- stages ----------------------------------------------------------------------------
    def _train_autoencoder(self, data: Sequence[Prepared], labels: Sequence[int],
                           sequences: Sequence[str], key: str, device: torch.device
                           ) -> dict[str, np.ndarray]:
        settings = self.settings
        autoencoder = build_autoencoder(settings.ae_channels, settings.latent_channels,
                                        settings.ae_res_blocks, settings.seed).to(device)
        optimiser = torch.optim.Adam(autoencoder.parameters(), lr=settings.ae_learning_rate)
        scheduler = warmup_schedule(optimiser, 0, settings.ae_steps, settings.ae_decay)
        modules: dict[str, torch.nn.Module] = {"autoencoder": autoencoder}
        optimisers: dict[str, torch.optim.Optimizer] = {"optimiser": optimiser}
        critic = None
        if settings.ae_adversarial_weight:
            critic = build_critic(settings.seed).to(device)
            modules["critic"] = critic
            optimisers["critic_optimiser"] = torch.optim.Adam(
                critic.parameters(), lr=5 * settings.ae_learning_rate)
        extractors = {seq: build_perceptual(perceptual_spec(settings, seq), device)
                      if settings.ae_perceptual_weight else None for seq in sequences}
        volumes = [torch.from_numpy(d.image)[None, None].to(device) for d in data]
        replica = distributed.replicate(SampledReconstruction(autoencoder))
        factor = downsampling(settings.ae_channels)

        def step(generator: torch.Generator) -> float:
            picks = [int(torch.randint(len(volumes), (1,), generator=generator))
                     for _ in range(settings.ae_batch)]
            crops = torch.cat([random_crop(volumes[i], settings.ae_crop, factor, generator)
                               for i in picks])
            noise = torch.randn((crops.shape[0], *latent_shape(
                crops.shape[2:], settings.ae_channels, settings.latent_channels)),
                generator=generator).to(device)
            reconstruction, mu, sigma = replica(crops, noise)
            loss = autoencoder_loss(reconstruction, mu, sigma, crops, settings.kl_weight)
            extractor = extractors[sequences[labels[picks[0]]]]
            if extractor is not None:
                loss = loss + settings.ae_perceptual_weight * perceptual_loss(
                    extractor, crops, reconstruction)
            if critic is not None:
                loss = loss + settings.ae_adversarial_weight * torch.mean(
                    (critic(reconstruction)[-1] - 1.0) ** 2)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            if critic is not None:
                critic_loss = 0.5 * (torch.mean((critic(crops)[-1] - 1.0) ** 2)
                                     + torch.mean(critic(reconstruction.detach())[-1] ** 2))
                optimisers["critic_optimiser"].zero_grad(set_to_none=True)
                critic_loss.backward()
                optimisers["critic_optimiser"].step()
            return float(loss.detach())

        losses = train_state(
            TrainingState(modules, optimisers, {"scheduler": scheduler}), step, settings.ae_steps,
            torch.Generator().manual_seed(settings.seed),
            checkpoint=checkpoint_path(self.checkpoint_dir, f"umh0-{key}"),
            checkpoint_every=settings.checkpoint_every, description="umh autoencoder",
        )
        autoencoder.eval()
        latents = [encode_scaled(autoencoder, d.image, 1.0, device) for d in data]
        arrays = module_arrays(autoencoder, AUTOENCODER)
        arrays[SCALE_FACTOR] = np.array([latent_scale([torch.from_numpy(z) for z in latents])])
        arrays[AE_LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        for k, seq in enumerate(sequences):
            scores = [reconstruction_scores(autoencoder, d, device)[0]
                      for d, label in zip(data, labels) if label == k]
            arrays[f"{AE_PSNR}_{seq}"] = np.array([float(np.mean(scores))])
        return arrays

    def _train_stage1(self, autoencoder: torch.nn.Module, scale: float,
                      data: Sequence[Prepared], latents: Sequence[np.ndarray],
                      labels: Sequence[int], sequences: Sequence[str], key: str,
                      device: torch.device) -> dict[str, np.ndarray]:
        settings = self.settings
        network = build_network(settings, len(sequences)).to(device)
        abar = alphas_cumprod(settings.beta_schedule)
        optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        scheduler = warmup_schedule(optimiser, settings.warmup_steps, settings.stage1_steps)
        extractors = {seq: build_perceptual(perceptual_spec(settings, seq), device)
                      for seq in sequences} if settings.weight_perceptual else {}
        examples = [Example(torch.from_numpy(d.image)[None, None].to(device),
                            torch.from_numpy(z)[None].to(device), label)
                    for d, z, label in zip(data, latents, labels)]
        replica = distributed.replicate(network)

        def step(generator: torch.Generator) -> float:
            example = examples[int(torch.randint(len(examples), (1,), generator=generator))]
            loss = stage1_loss(replica, autoencoder, scale, example,
                               extractors.get(sequences[example.label]), abar, settings,
                               generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_norm:
                torch.nn.utils.clip_grad_norm_(network.parameters(), settings.clip_norm)
            optimiser.step()
            scheduler.step()
            return float(loss.detach())

        losses = train_state(
            TrainingState({"network": network}, {"optimiser": optimiser},
                          {"scheduler": scheduler}),
            step, settings.stage1_steps, torch.Generator().manual_seed(settings.seed + 1),
            checkpoint=checkpoint_path(self.checkpoint_dir, f"umh1-{key}"),
            checkpoint_every=settings.checkpoint_every, description="umh stage 1",
        )
        arrays = module_arrays(network, STAGE1)
        arrays[LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        return arrays

    def _train_stage2(
        self, autoencoder: torch.nn.Module, stage1: ConditionalDiffusionUNet, scale: float,
        data: Sequence[Prepared], unified: Sequence[np.ndarray], labels: Sequence[int],
        sites: Sequence[str], target_site: str, sequences: Sequence[str], key: str,
        device: torch.device,
    ) -> dict[str, np.ndarray]:
        settings = self.settings
        abar = alphas_cumprod(settings.beta_schedule)
        grid_forward = timestep_grid(settings.t_stop, settings.inversion_steps)
        grid_reverse = timestep_grid(settings.t_stop, settings.reverse_steps)
        psi_volumes = [d.image for d in data]
        psi_key = fingerprint({"psi": settings.psi, "steps": settings.psi_steps,
                               "seed": settings.seed}, psi_volumes)
        psi_arrays = self._stage("psi", psi_key, lambda: style_encoder_stage(
            settings.psi, psi_volumes, list(sites), steps=settings.psi_steps,
            seed=settings.seed, device=device))
        psi = load_style_encoder(settings.psi, psi_arrays, device)
        images = [torch.from_numpy(d.image)[None, None].to(device) for d in data]
        unified_t = [torch.from_numpy(u)[None, None].to(device) for u in unified]
        stage1.eval()
        with torch.no_grad():
            starts = [encode(autoencoder, u) * scale for u in unified_t]
            conditions = [instance_normalise(z) for z in starts]
            noisy = [invert(eps_function(stage1, c, label), z, grid_forward, abar)
                     for z, c, label in zip(starts, conditions, labels)]
            target_styles = {i: style_vector(psi, images[i], unified_t[i])
                             for i, s in enumerate(sites) if s == target_site}
        network = copy.deepcopy(stage1).train()
        optimiser = torch.optim.Adam(network.parameters(), lr=settings.stage2_learning_rate)
        sources = [i for i, s in enumerate(sites) if s != target_site]
        targets = list(target_styles)
        replica = distributed.replicate(network)

        def render(latent: torch.Tensor) -> torch.Tensor:
            return decode(autoencoder, latent / scale)

        def step(generator: torch.Generator) -> float:
            """A random source image with a random target image of its sequence."""
            source = sources[int(torch.randint(len(sources), (1,), generator=generator))]
            label = labels[source]
            same = [i for i in targets if labels[i] == label]
            target = same[int(torch.randint(len(same), (1,), generator=generator))]
            return style_updates(
                optimiser, list(network.parameters()), psi, target_styles[target],
                reverse_last_k(eps_function(replica, conditions[source], label),
                               noisy[source], grid_reverse, abar, settings.last_k),
                reverse_last_k(eps_function(replica, conditions[target], label),
                               noisy[target], grid_reverse, abar, settings.last_k),
                unified_t[source], unified_t[target], render=render)

        losses = train_state(
            TrainingState({"network": network}, {"optimiser": optimiser}), step,
            settings.stage2_epochs * len(sources),
            torch.Generator().manual_seed(settings.seed + 2),
            checkpoint=checkpoint_path(self.checkpoint_dir, f"umh2-{key}"),
            checkpoint_every=max(1, settings.checkpoint_every // 10),
            description="umh stage 2",
        )
        network.eval()
        arrays = module_arrays(network, STAGE2)
        arrays.update(psi_arrays)
        arrays[STAGE2_LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        for k, seq in enumerate(sequences):
            arrays[f"target_wd_{seq}"] = target_wd_diagnostic(
                autoencoder, stage1, network, scale, data, unified, labels, sites,
                target_site, k, settings, device)
        return arrays


# -- settings ------------------------------------------------------------------------------
#: Fields that decide the autoencoder's weights (and ``perceptual`` when it trains with L_P),
#: and stage 1's (with the autoencoder's key).
AE_FIELDS = ("ae_channels", "latent_channels", "ae_res_blocks", "ae_steps", "ae_crop",
             "ae_batch", "ae_learning_rate", "ae_decay", "kl_weight", "ae_perceptual_weight",
             "ae_adversarial_weight", "seed")
STAGE1_FIELDS = ("channels", "attention_levels", "res_blocks", "norm_groups", "head_channels",
                 "space_to_channel", "stage1_steps", "learning_rate", "warmup_steps", "clip_norm", "beta_schedule",
                 "t_max", "weight_noise", "weight_gradient", "weight_perceptual", "perceptual",
                 "decode_block", "decode_halo", "seed")


def _validate(settings: UMHSettings) -> None:
    """Reject settings that cannot train or sample, naming the parameter."""
    positive = ("latent_channels", "ae_res_blocks", "ae_steps", "ae_batch", "res_blocks",
                "space_to_channel",
                "norm_groups", "head_channels", "stage1_steps", "t_max", "t_stop",
                "inversion_steps", "reverse_steps", "stage2_epochs", "last_k",
                "checkpoint_every")
    for name in positive:
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"umh needs {name} >= 1, got {getattr(settings, name)}")
    for name in ("ae_channels", "channels"):
        if len(getattr(settings, name)) < 2:
            raise UsageError(f"umh {name} needs at least 2 levels, got {getattr(settings, name)}")
    if any(not 0 <= level < len(settings.channels) for level in settings.attention_levels):
        raise UsageError(f"umh attention_levels must lie among 0 .. "
                         f"{len(settings.channels) - 1}, got {settings.attention_levels}")
    if any(c % settings.norm_groups for c in settings.channels):
        raise UsageError(f"umh channels {settings.channels} must be multiples of "
                         f"norm_groups {settings.norm_groups}")
    factor = downsampling(settings.ae_channels)
    if settings.ae_crop and settings.ae_crop % factor:
        raise UsageError(f"umh ae_crop must be 0 or a multiple of {factor} (the latent "
                         f"grid's step), got {settings.ae_crop}")
    if settings.ae_decay not in ("none", "cosine"):
        raise UsageError(f"umh ae_decay must be none or cosine, got {settings.ae_decay!r}")
    if settings.beta_schedule not in BETA_SCHEDULES:
        raise UsageError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                         f"got {settings.beta_schedule!r}")
    for name in ("t_max", "t_stop", "inference_t_stop"):
        if not 0 <= int(getattr(settings, name)) <= TRAINING_STEPS:
            raise UsageError(f"umh {name} must lie in 0 .. {TRAINING_STEPS}")
    if max(settings.inversion_steps, settings.reverse_steps) > settings.t_stop:
        raise UsageError("umh inversion_steps and reverse_steps must not exceed t_stop")
    for name in ("ae_learning_rate", "learning_rate", "stage2_learning_rate"):
        if not getattr(settings, name) > 0:
            raise UsageError(f"umh {name} must be > 0, got {getattr(settings, name)}")
    for name in ("ae_crop", "warmup_steps", "decode_block", "decode_halo", "psi_steps",
                 "kl_weight", "ae_perceptual_weight", "ae_adversarial_weight",
                 "weight_noise", "weight_gradient", "weight_perceptual"):
        if getattr(settings, name) < 0:
            raise UsageError(f"umh needs {name} >= 0, got {getattr(settings, name)}")
    if settings.perceptual != AUTO:
        parse_perceptual(settings.perceptual)
    backend, _ = parse_psi(settings.psi)
    if backend in TRAINED_PSI and settings.psi_steps < 1:
        raise UsageError(f"umh psi={settings.psi} is trained: it needs psi_steps >= 1")
    validate_device(settings.device)


def _divisor(settings: UMHSettings) -> int:
    """Image sides must be multiples of this: the autoencoder's step times the U-Net's."""
    return (downsampling(settings.ae_channels) * settings.space_to_channel
            * 2 ** (len(settings.channels) - 1))


def perceptual_spec(settings: UMHSettings, sequence: str) -> str:
    """The L_P network a sequence trains with: ``auto`` is deepbet for T1w, none otherwise."""
    if settings.perceptual != AUTO:
        return settings.perceptual
    return "deepbet" if sequence == T1W else "none"


def build_network(settings: UMHSettings, classes: int) -> ConditionalDiffusionUNet:
    """The latent U-Net with weights from ``settings.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return ConditionalDiffusionUNet(
            settings.channels,
            [level in settings.attention_levels for level in range(len(settings.channels))],
            settings.res_blocks, settings.norm_groups, settings.head_channels, classes,
            settings.space_to_channel, image_channels=settings.latent_channels,
        )


def build_critic(seed: int) -> torch.nn.Module:
    """HCLD's autoencoder critic: MONAI's PatchDiscriminator, 3 layers, 32 channels."""
    from monai.networks.nets import PatchDiscriminator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1,
                                  out_channels=1)


def load_network(settings: UMHSettings, classes: int, state: dict[str, np.ndarray],
                 prefix: str, device: torch.device) -> ConditionalDiffusionUNet:
    network = build_network(settings, classes)
    network.load_state_dict(module_state(state, prefix))
    return network.to(device).eval()


def load_autoencoder(settings: UMHSettings, state: dict[str, np.ndarray],
                     device: torch.device) -> torch.nn.Module:
    """The trained autoencoder, frozen (stages 1 and 2 backpropagate through it, never into
    it)."""
    autoencoder = build_autoencoder(settings.ae_channels, settings.latent_channels,
                                    settings.ae_res_blocks, settings.seed)
    autoencoder.load_state_dict(module_state(state, AUTOENCODER))
    autoencoder.requires_grad_(False)
    return autoencoder.to(device).eval()


# -- data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """One brain box in the nets' terms: the image in [-1, 1] (background -1), padded at the
    end to the divisor, and its brain mask (False in the padding)."""

    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Example:
    """A stage-1 training example on the device: image, scaled clean latent, sequence."""

    image: torch.Tensor
    latent: torch.Tensor
    label: int


def prepare(image: Volume, divisor: int) -> Prepared:
    shape = padded_shape(image.data.shape, divisor)
    data = np.where(image.mask, 2.0 * image.data - 1.0, -1.0).astype(np.float32)
    return Prepared(pad_end(data, shape, -1.0), pad_end(image.mask.astype(bool), shape, False))


def random_crop(volume: torch.Tensor, side: int, step: int, generator: torch.Generator
                ) -> torch.Tensor:
    """A ``side``^3 crop (0 or longer than an axis: that whole axis) whose corner lies on
    multiples of ``step``, the latent grid's, so crops see the phase the whole box does."""
    shape = volume.shape[2:]
    sides = [n if not side or side >= n else side for n in shape]
    corner = [step * c for c in random_corner([n // step for n in shape],
                                               [s // step for s in sides], generator)]
    return volume[(slice(None), slice(None),
                   *(slice(c, c + s) for c, s in zip(corner, sides)))]


def encode_scaled(autoencoder: torch.nn.Module, image: np.ndarray, scale: float,
                  device: torch.device) -> np.ndarray:
    """``scale * E(image)``, the latent the diffusion model works on, (C, X, Y, Z)."""
    with torch.no_grad():
        latent = encode(autoencoder, torch.from_numpy(image)[None, None].to(device))
    return (latent[0] * scale).cpu().numpy().astype(np.float32)


def brain_values(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (image[mask] + 1.0) / 2.0


def reconstruction_scores(autoencoder: torch.nn.Module, data: Prepared, device: torch.device
                          ) -> tuple[float, float]:
    """PSNR (dB) and SSIM of D(E(image)) against the image, inside the brain, on [0, 1]."""
    with torch.no_grad():
        out = decode(autoencoder, encode(autoencoder,
                                         torch.from_numpy(data.image)[None, None].to(device)))
    image = (data.image + 1.0) / 2.0
    rebuilt = np.clip((out[0, 0].cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
    return (psnr(image, rebuilt, data.mask), ssim(image, rebuilt, data.mask))


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


def _text(array: np.ndarray) -> str:
    return bytes(np.asarray(array, dtype=np.uint8)).decode()


# -- losses and inference ------------------------------------------------------------------
def stage1_loss(network: torch.nn.Module, autoencoder: torch.nn.Module, scale: float,
                example: Example, extractor: torch.nn.Module | None, abar: torch.Tensor,
                settings: UMHSettings, generator: torch.Generator) -> torch.Tensor:
    """L_C = L_N + L_G + L_P (weighted) on one latent at a random t (paper Eqs. 2, 4, 5)."""
    latent = example.latent
    t = torch.randint(1, settings.t_max + 1, (1,), generator=generator)
    noise = torch.randn(latent.shape, generator=generator).to(latent.device)
    noisy = add_noise(latent, noise, t.to(latent.device), abar)
    condition = instance_normalise(latent)
    classes = torch.tensor([example.label], device=latent.device)
    eps = network(noisy, t.to(latent.device), condition, classes)
    loss = settings.weight_noise * torch.mean((eps - noise) ** 2)
    if not (settings.weight_gradient or (settings.weight_perceptual and extractor is not None)):
        return loss
    clean = estimate_clean(noisy, eps, t.to(latent.device), abar) / scale
    factor = downsampling(settings.ae_channels)
    shape = latent.shape[2:]
    side = [n if not settings.decode_block else min(settings.decode_block, n) for n in shape]
    corner = random_corner(shape, side, generator)
    estimate, index = decode_block(autoencoder, clean, corner, side, settings.decode_halo,
                                   factor)
    reference = example.image[(slice(None), slice(None), *index)]
    if settings.weight_gradient:
        target = gradient_map(reference)
        scale_g = gradient_scale(target)
        loss = loss + settings.weight_gradient * torch.mean(
            ((gradient_map(estimate) - target) / scale_g) ** 2)
    if settings.weight_perceptual and extractor is not None:
        loss = loss + settings.weight_perceptual * perceptual_loss(extractor, reference,
                                                                   estimate)
    return loss


def _noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def unify(autoencoder: torch.nn.Module, network: ConditionalDiffusionUNet, scale: float,
          data: Prepared, latent: np.ndarray, label: int, settings: UMHSettings, t_stop: int,
          device: torch.device) -> np.ndarray:
    """Stage 1's output (Eq. 6), in [-1, 1]: the latent noised to ``t_stop`` with seeded noise
    (Eq. 1), reverse DDIM (Eq. 3) under IN(Z0), decoded; background -1."""
    abar = alphas_cumprod(settings.beta_schedule)
    z0 = torch.from_numpy(latent)[None].to(device)
    eps = eps_function(network, instance_normalise(z0), label)
    noisy = add_noise(z0, _noise(z0.shape, settings.seed, device), torch.tensor([t_stop]), abar)
    out = reverse(eps, noisy, timestep_grid(t_stop, min(settings.reverse_steps, t_stop)), abar)
    image = decode(autoencoder, out / scale)[0, 0].cpu().numpy()
    return np.where(data.mask, image, -1.0).astype(np.float32)


@torch.no_grad()
def translate(autoencoder: torch.nn.Module, stage1: ConditionalDiffusionUNet,
              stage2: ConditionalDiffusionUNet, scale: float, data: Prepared,
              unified: np.ndarray, label: int, settings: UMHSettings, t_stop: int,
              device: torch.device) -> np.ndarray:
    """Stage 2's output (Eqs. 7-8): the unified image re-encoded, inverted with the stage-1
    model, reversed with the fine-tuned one and decoded; in [-1, 1], background -1."""
    abar = alphas_cumprod(settings.beta_schedule)
    z0 = encode(autoencoder, torch.from_numpy(unified)[None, None].to(device)) * scale
    condition = instance_normalise(z0)
    noisy = invert(eps_function(stage1, condition, label), z0,
                   timestep_grid(t_stop, min(settings.inversion_steps, t_stop)), abar)
    out = reverse(eps_function(stage2, condition, label), noisy,
                  timestep_grid(t_stop, min(settings.reverse_steps, t_stop)), abar)
    image = decode(autoencoder, out / scale)[0, 0].cpu().numpy()
    return np.where(data.mask, image, -1.0).astype(np.float32)


def target_wd_diagnostic(
    autoencoder: torch.nn.Module, stage1: ConditionalDiffusionUNet,
    stage2: ConditionalDiffusionUNet, scale: float, data: Sequence[Prepared],
    unified: Sequence[np.ndarray], labels: Sequence[int], sites: Sequence[str],
    target_site: str, label: int, settings: UMHSettings, device: torch.device,
) -> np.ndarray:
    """(before, after): mean WD of a few source-site training images of one sequence to the
    target site's pooled brain intensities, un-harmonized and after stage 2."""
    target = np.concatenate([brain_values(d.image, d.mask)
                             for d, s, k in zip(data, sites, labels)
                             if s == target_site and k == label])
    chosen: list[int] = []
    for site in sorted(set(sites) - {target_site}):
        chosen += [i for i, (s, k) in enumerate(zip(sites, labels))
                   if s == site and k == label][:DIAGNOSTIC_IMAGES_PER_SITE]
    if not chosen:
        return np.array([math.nan, math.nan])
    before, after = [], []
    for i in chosen:
        out = translate(autoencoder, stage1, stage2, scale, data[i], unified[i], label,
                        settings, settings.t_stop, device)
        before.append(wasserstein(brain_values(data[i].image, data[i].mask), target))
        after.append(wasserstein(brain_values(out, data[i].mask), target))
    return np.array([np.mean(before), np.mean(after)], dtype=np.float64)

