"""SGCD: semantic-guided conditional diffusion, one image-space model for every site and
sequence (paper 001, with its appendix).

Stage 1 (sequence-specific global harmonization) trains a conditional diffusion model on every
training image of every site and sequence: the noisy image and its gradient map in, the
sequence as class embedding, loss L_N + L_G + L_E, where L_E pulls the one-step estimate's
soft histogram, mean and std toward a per-sequence EMA record of all sites. DDIM inversion to
``t_stop`` with the model's own noise and reverse diffusion then map any image into the
sequence's unified domain (``--target-site unified`` stops here). Stage 2 (target-specific fine
harmonization) fine-tunes a copy of the model so that the style vector
Psi(X->T) - Psi(X') of a translated source image matches the target's Psi(T) - Psi(T') (L_S)
and a target image keeps its own (L_R), with Psi a frozen image encoder
(:mod:`bids_harmony.nn.style`). The diffusion core is :mod:`bids_harmony.nn.ddim`, the
statistics :mod:`bids_harmony.nn.histogram`.
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

from bids_harmony.errors import UsageError
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
    plot_loss_curve,
    resolve_settings,
    summarise_losses,
)
from bids_harmony.harmonizers.registry import register
from bids_harmony.metrics.similarity import wasserstein
from bids_harmony.nn import TrainingState, checkpoint_path, fingerprint, train_state
from bids_harmony.nn.ddim import (
    add_noise,
    alphas_cumprod,
    BETA_SCHEDULES,
    estimate_clean,
    invert,
    reverse,
    reverse_last_k,
    timestep_grid,
    TRAINING_STEPS,
)
from bids_harmony.nn import distributed
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.diffusion_unet import ConditionalDiffusionUNet, eps_function
from bids_harmony.nn.histogram import EmaRecord, gradient_map, gradient_scale, soft_histogram
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

#: State-array prefixes: the stage-1 network, the fine-tuned one, the EMA record.
STAGE1, STAGE2, EMA = "stage1.", "stage2.", "ema."
CLASS_LABEL = "class_label"
STAGE2_LOSS_HISTORY = "stage2_loss_history"
#: Settings that change neither stage's weights (they are left out of the fingerprints).
NOT_IN_FINGERPRINT = ("device", "checkpoint_every", "inference_t_stop")
#: Diagnostics: between-site WD of the training images before / after stage 1, and WD of
#: source-site training images to the target site's before / after stage 2.
SITE_WD_SOURCE, SITE_WD_UNIFIED = "site_wd_source", "site_wd_unified"
TARGET_WD_SOURCE, TARGET_WD_HARMONIZED = "target_wd_source", "target_wd_harmonized"
#: The Psi backends that train on the training images (the others are fixed).
TRAINED_PSI = ("style-contrastive", "site-contrastive")
#: Source-site training images per site the stage-2 diagnostic translates.
DIAGNOSTIC_IMAGES_PER_SITE = 2


@dataclass(frozen=True)
class SGCDSettings:
    """Everything that defines an SGCD model. Defaults are the paper's where it gives one.

    Network: MONAI ``DiffusionModelUNet`` ``channels`` per level, self-attention at the
    (0-based) ``attention_levels``,
    ``res_blocks``, GroupNorm ``norm_groups``, ``head_channels`` per attention head, behind a
    ``space_to_channel`` rearrangement (1: none). Schedule: ``beta_schedule`` (``linear``,
    the paper; ``scaled_linear``, the code) from 0.0015 to 0.0195 over 1000 steps.

    Stage 1: ``stage1_steps`` Adam steps at ``learning_rate`` (one image per step), warm-up
    ``warmup_steps``, clipping ``clip_norm`` (0: off); t drawn uniformly from
    1 .. ``t_max`` (paper: 1000); loss weights ``weight_noise``, ``weight_gradient``,
    ``weight_ema``. The EMA record: decay ``ema_decay`` (paper 0.2; code 0.9), soft
    histogram ``histogram_bins`` with kernel width ``histogram_sigma`` (paper: not stated;
    code 0.01), on ``ema_voxels`` random brain voxels per step (0: all), and
    ``ema_gate_t`` (0: every t, the paper; code 100: updated and applied only below it,
    weighted 1 - t / gate).

    Inference (and stage 2's trajectories): inversion to ``t_stop`` in ``inversion_steps``
    (T_f) and reverse diffusion in ``reverse_steps`` (T_r); ``inference_t_stop`` (0: the
    trained ``t_stop``) changes only the depth of harmonization at transform.

    Stage 2: ``stage2_epochs`` times as many draws as there are source-site images (each a
    random source image with a random target image of its sequence) at
    ``stage2_learning_rate``, gradients through the last ``last_k`` reverse steps; Psi is
    ``psi`` (:data:`bids_harmony.nn.style.PSI_BACKENDS`), trained ``psi_steps`` steps where it
    learns.
    """

    channels: tuple[int, ...]
    attention_levels: tuple[int, ...]
    res_blocks: int
    norm_groups: int
    head_channels: int
    space_to_channel: int
    stage1_steps: int
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    clip_norm: float = 0.0
    beta_schedule: str = "linear"
    t_max: int = 1000
    weight_noise: float = 1.0
    weight_gradient: float = 1.0
    weight_ema: float = 1.0
    ema_decay: float = 0.2
    histogram_bins: int = 100
    histogram_sigma: float = 0.01
    ema_voxels: int = 0
    ema_gate_t: int = 0
    t_stop: int = 250
    inversion_steps: int = 35
    reverse_steps: int = 25
    inference_t_stop: int = 0
    stage2_epochs: int = 30
    stage2_learning_rate: float = 1e-6
    last_k: int = 10
    psi: str = "style-contrastive"
    psi_steps: int = 300
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100


#: ``tiny``: tests, seconds on 24^3 phantoms and a smoke run on a 2 mm brain (4x4x4 blocks
#: into channels keep its attention at 1,200 tokens there). ``cpu``: the default without a GPU, the
#: space-to-channel net on the 2 mm brain box (about 45 min on 2 cores); t up to 250 in
#: training and t_stop 100 (alpha-bar 0.79) at inference, since a short run learns the
#: low-noise end the inference uses; the EMA loss weighted 10 with the code's decay 0.9
#: (at the paper's 1 and 0.2 a 500-step model left the held-out heads' between-site WD
#: unchanged, 0.0274 vs 0.0273, benchmarks/results/multisite_methods.md); stage 2 at lr 1e-4,
#: as 1e-6 moves nothing in ~100 updates. ``fast``: the paper's net at 2 mm on one GPU.
#: ``paper``: the paper's settings (its T_f = 35 / T_r = 25 as step counts; the depth
#: t_stop is not stated, 250 here).
PRESETS: dict[str, SGCDSettings] = {
    "tiny": SGCDSettings((8, 16), (1,), 1, 4, 8, 4, 20, learning_rate=1e-3,
                         t_max=250, t_stop=30, inversion_steps=3, reverse_steps=3,
                         stage2_epochs=1, stage2_learning_rate=1e-4, last_k=1,
                         psi="random-gram", psi_steps=0, checkpoint_every=10),
    "cpu": SGCDSettings((32, 64, 64), (2,), 1, 16, 32, 2, 500,
                        learning_rate=5e-4, warmup_steps=50, clip_norm=1.0, t_max=250,
                        weight_ema=10.0, ema_decay=0.9, ema_voxels=50_000, t_stop=100,
                        inversion_steps=8, reverse_steps=8, stage2_epochs=6,
                        stage2_learning_rate=1e-4, last_k=2, psi_steps=200),
    "fast": SGCDSettings((32, 64, 256, 256), (2, 3), 2, 16, 32, 1, 20_000,
                         warmup_steps=500, clip_norm=1.0, t_max=500, t_stop=100,
                         inversion_steps=25, reverse_steps=25, stage2_epochs=10,
                         stage2_learning_rate=1e-5, last_k=5, psi_steps=2000),
    "paper": SGCDSettings((32, 64, 256, 256), (2, 3), 2, 16, 32, 1, 60_000,
                          psi_steps=2000),
}
#: Measured seconds per stage-1 step on 2 CPU cores, for the time logged before training.
CPU_SECONDS_PER_STEP = {"cpu": 1.3, "tiny": 0.05}


@register("sgcd")
class SGCD(LearnedHarmonizer):
    """SGCD: one conditional diffusion model for every site and sequence, fine-tuned to a
    target site with a style-vector loss.

    ``preset`` sets every field of :class:`SGCDSettings`; keyword overrides replace single
    fields. Choices the paper leaves open or that follow the public code (MMH):

    * Images enter as ``2 * data - 1`` on the brain box of the training masks (background
      -1), so the paper's [0, 1] histogram range is ``(x + 1) / 2`` of the estimate, taken
      inside the brain mask.
    * The condition is the gradient map (Eq. 2) divided by its largest magnitude, into
      [-1, 1] (the paper's normalisation; the code divides by a percentile and squashes with
      tanh). L_G compares the estimate's gradient map on the clean image's scale, so a noisy
      estimate's outliers do not rescale it.
    * One image per step (the code: batch 1); the record is updated before the loss is taken
      (Algorithm 1, lines 12-16).
    * Stage 1's unified images come from DDIM inversion (Eq. 10, the model's own noise) to
      ``t_stop`` and reverse diffusion (Eq. 9); the paper does not state the depth. Stage 2
      inverts the unified images with the stage-1 model (Algorithm 2, lines 1-11) and
      reverses with the model being tuned; each of the last ``last_k`` reverse steps is its
      own update (the code's ``last_k``), and its one-step clean estimate is the translated
      image the losses see. Each update pairs one source image with a random target image
      for L_S and L_R.
    * Psi is applied tri-planarly and frozen (:mod:`bids_harmony.nn.style`); only
      ``biomedclip:DIR`` is the paper's setting, the default ``style-contrastive`` is a
      substitute that nothing needs to download.
    * Not used from the code: its AdaIN mappers fed by the EMA statistics, the soft-peak
      loss, the mean/std matching of inputs and outputs to a target image, and its 50-step
      DDIM schedule (which queries the network only at t < 50).
    """

    citation = ("Multi-site multi-sequence brain MRI harmonization via semantic-guided "
                "conditional diffusion (SGCD); published code: MW1798/MMH_Harmonization.")
    presets: ClassVar[tuple[str, ...]] = ("auto", *PRESETS)
    loss_label: ClassVar[str] = "stage-1 loss (L_N + L_G + L_E)"

    def __init__(self, preset: str = "auto", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        if "channels" in overrides:
            overrides["channels"] = tuple(int(c) for c in overrides["channels"])
        if "attention_levels" in overrides:
            overrides["attention_levels"] = tuple(int(a) for a in overrides["attention_levels"])
        preset = machine_preset(preset, overrides.get("device", "auto"))
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        params = asdict(settings)
        params["channels"] = list(settings.channels)
        params["attention_levels"] = list(settings.attention_levels)
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **params)

    # -- contract --------------------------------------------------------------------------
    def _fit_sequences(self, training: TrainingSet) -> FittedState:
        settings = self.settings
        device = resolve_device(settings.device)
        sequences = sorted(training.images)
        probe = build_network(settings, len(sequences))
        images = [im for seq in sequences for im in training.images[seq]]
        labels = [sequences.index(seq) for seq in sequences for _ in training.images[seq]]
        sites = [site for seq in sequences for site in training.sites[seq]]
        box = BrainBox.around([im.mask for im in images], [probe.divisor] * 3)
        data = [prepare(box.crop(im)) for im in images]
        stage1_settings = {name: value for name, value in asdict(settings).items()
                           if name in STAGE1_FIELDS}
        stage1_key = fingerprint({**stage1_settings, "sequences": sequences},
                                 [d.image for d in data] + [np.array(labels)])
        self._announce(settings.stage1_steps, CPU_SECONDS_PER_STEP.get(self.params["preset"]))
        stage1 = self._stage("stage1", stage1_key, lambda: self._train_stage1(
            data, labels, len(sequences), stage1_key, device))
        network = load_network(settings, len(sequences), stage1, STAGE1, device)
        unified_key = fingerprint({"stage1": stage1_key, "t_stop": settings.t_stop,
                                   "inversion_steps": settings.inversion_steps,
                                   "reverse_steps": settings.reverse_steps}, [])

        def unify_training_images() -> dict[str, np.ndarray]:
            return {f"image_{i}": harmonize_unified(network, d, label, settings,
                                                    settings.t_stop, device)
                    for i, (d, label) in enumerate(zip(data, labels))}

        cached = self._stage("unified", unified_key, unify_training_images)
        unified = [cached[f"image_{i}"] for i in range(len(data))]
        shared = {**stage1, **box.to_state()}
        per_sequence: dict[str, dict[str, np.ndarray]] = {}
        site_wd = {seq: (between_site_wd([brain_values(d) for d, s in zip(data, labels)
                                          if s == k],
                                         [x for x, s in zip(sites, labels) if s == k]),
                         between_site_wd([brain_values(replace_image(d, u)) for d, u, s
                                          in zip(data, unified, labels) if s == k],
                                         [x for x, s in zip(sites, labels) if s == k]))
                   for k, seq in enumerate(sequences)}
        for k, seq in enumerate(sequences):
            # One network serves every sequence: each sequence's card shows the joint curve.
            per_sequence[seq] = {CLASS_LABEL: np.array([k], dtype=np.int64),
                                 LOSS_HISTORY: stage1[LOSS_HISTORY]}
        if training.target_site != UNIFIED:
            stage2_settings = {name: value for name, value in asdict(settings).items()
                               if name not in NOT_IN_FINGERPRINT}
            stage2_key = fingerprint(
                {**stage2_settings, "stage1": stage1_key, "target": training.target_site},
                [np.array([s == training.target_site for s in sites])],
            )
            stage2 = self._stage("stage2", stage2_key, lambda: self._train_stage2(
                network, data, unified, labels, sites, training.target_site, sequences,
                stage2_key, device))
            shared.update({k: v for k, v in stage2.items()
                           if k.startswith(STAGE2) or k == PSI_DESCRIPTION})
            for seq in sequences:
                per_sequence[seq][STAGE2_LOSS_HISTORY] = stage2[STAGE2_LOSS_HISTORY]
        for k, seq in enumerate(sequences):
            history = {"step": settings.stage1_steps, SITE_WD_UNIFIED: site_wd[seq][1]}
            baselines = {SITE_WD_SOURCE: site_wd[seq][0]}
            if training.target_site != UNIFIED:
                history[TARGET_WD_HARMONIZED] = float(stage2[f"target_wd_{seq}"][1])
                baselines[TARGET_WD_SOURCE] = float(stage2[f"target_wd_{seq}"][0])
            per_sequence[seq].update(monitor_arrays([history], baselines, held_out=False))
        shared = {k: v for k, v in shared.items() if k != LOSS_HISTORY}
        return FittedState(per_sequence, shared)

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """Stage 1 that does not bring the sites' intensity distributions closer, or a stage
        2 that does not bring source images closer to the target site, learned nothing."""
        final, baselines = diagnostics["history"][-1], diagnostics["baselines"]
        warnings = []
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
        """Both stages' loss curves; Psi named with its checksum."""
        super()._add_to_card(card, staging)
        card["loss_curve_stage2"] = {}
        for sequence, seq_state in self.state_.items():
            if STAGE2_LOSS_HISTORY not in seq_state:
                continue
            steps, losses = summarise_losses(seq_state[STAGE2_LOSS_HISTORY])
            card["loss_curve_stage2"][sequence] = {"step": steps, "loss": losses}
            plot_loss_curve(seq_state[STAGE2_LOSS_HISTORY], f"SGCD stage 2, {sequence}",
                            "style loss (L_S + L_R)", staging / f"loss_stage2_{sequence}.png")
        if PSI_DESCRIPTION in self.shared_state_:
            card["psi"] = stage_description(self.shared_state_)

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        settings = self.settings
        device = resolve_device(settings.device)
        classes = len(self.training_["sequences"])
        label = int(state[CLASS_LABEL][0])
        box = BrainBox.from_state(state)
        data = prepare(box.crop(image))
        t_stop = settings.inference_t_stop or settings.t_stop
        stage1 = load_network(settings, classes, state, STAGE1, device)
        unified = harmonize_unified(stage1, data, label, settings, t_stop, device)
        if self.target_site_ != UNIFIED:
            stage2 = load_network(settings, classes, state, STAGE2, device)
            unified = translate(stage1, stage2, data, unified, label, settings, t_stop, device)
        out = np.clip((unified + 1.0) / 2.0, 0.0, 1.0)
        return box.uncrop(out)

    # -- stages ----------------------------------------------------------------------------
    def _train_stage1(self, data: Sequence[Prepared], labels: Sequence[int], classes: int,
                      key: str, device: torch.device) -> dict[str, np.ndarray]:
        settings = self.settings
        network = build_network(settings, classes).to(device)
        record = EmaRecord(classes, settings.histogram_bins, settings.ema_decay).to(device)
        abar = alphas_cumprod(settings.beta_schedule)
        optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        scheduler = warmup_schedule(optimiser, settings.warmup_steps, settings.stage1_steps)
        tensors = [d.to_device(device) for d in data]
        replica = distributed.replicate(network)

        def step(generator: torch.Generator) -> float:
            index = int(torch.randint(len(tensors), (1,), generator=generator))
            loss = stage1_loss(replica, record, tensors[index], labels[index], abar, settings,
                               generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_norm:
                torch.nn.utils.clip_grad_norm_(network.parameters(), settings.clip_norm)
            optimiser.step()
            scheduler.step()
            distributed.average_buffers(record)
            return float(loss.detach())

        state = TrainingState({"network": network, "ema_record": record},
                              {"optimiser": optimiser}, {"scheduler": scheduler})
        generator = torch.Generator().manual_seed(settings.seed)
        losses = train_state(
            state, step, settings.stage1_steps, generator,
            checkpoint=checkpoint_path(self.checkpoint_dir, f"sgcd1-{key}"),
            checkpoint_every=settings.checkpoint_every, description="sgcd stage 1",
        )
        arrays = module_arrays(network, STAGE1)
        arrays.update(module_arrays(record, EMA))
        arrays[LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        return arrays

    def _train_stage2(
        self, stage1: ConditionalDiffusionUNet, data: Sequence[Prepared],
        unified: Sequence[np.ndarray], labels: Sequence[int], sites: Sequence[str],
        target_site: str, sequences: Sequence[str], key: str, device: torch.device,
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
        tensors = [d.to_device(device) for d in data]
        unified_t = [torch.from_numpy(u)[None, None].to(device) for u in unified]
        stage1.eval()
        with torch.no_grad():
            noisy = [invert(eps_function(stage1, t.condition, label), u, grid_forward, abar)
                     for t, u, label in zip(tensors, unified_t, labels)]
            network = copy.deepcopy(stage1).train()
        optimiser = torch.optim.Adam(network.parameters(), lr=settings.stage2_learning_rate)
        sources = [i for i, s in enumerate(sites) if s != target_site]
        targets = [i for i, s in enumerate(sites) if s == target_site]
        with torch.no_grad():
            target_styles = {i: style_vector(psi, tensors[i].image, unified_t[i]) for i in targets}
        replica = distributed.replicate(network)

        def step(generator: torch.Generator) -> float:
            """A random source image with a random target image of its sequence: ``last_k``
            updates; returns their mean loss."""
            source = sources[int(torch.randint(len(sources), (1,), generator=generator))]
            label = labels[source]
            same = [i for i in targets if labels[i] == label]
            target = same[int(torch.randint(len(same), (1,), generator=generator))]
            return style_updates(
                optimiser, list(network.parameters()), psi, target_styles[target],
                reverse_last_k(eps_function(replica, tensors[source].condition, label),
                               noisy[source], grid_reverse, abar, settings.last_k),
                reverse_last_k(eps_function(replica, tensors[target].condition, label),
                               noisy[target], grid_reverse, abar, settings.last_k),
                unified_t[source], unified_t[target])

        state = TrainingState({"network": network}, {"optimiser": optimiser})
        checkpoint = checkpoint_path(self.checkpoint_dir, f"sgcd2-{key}")
        losses = train_state(
            state, step, settings.stage2_epochs * len(sources),
            torch.Generator().manual_seed(settings.seed + 1), checkpoint=checkpoint,
            checkpoint_every=max(1, settings.checkpoint_every // 10),
            description="sgcd stage 2",
        )
        network.eval()
        arrays = module_arrays(network, STAGE2)
        arrays.update(psi_arrays)
        arrays[STAGE2_LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        for k, seq in enumerate(sequences):
            arrays[f"target_wd_{seq}"] = target_wd_diagnostic(
                stage1, network, data, unified, labels, sites, target_site, k, settings, device)
        return arrays


# -- settings ------------------------------------------------------------------------------
#: Fields that decide stage 1's weights (its cache key); the rest only change stage 2 or
#: inference.
STAGE1_FIELDS = (
    "channels", "attention_levels", "res_blocks", "norm_groups", "head_channels",
    "space_to_channel",
    "stage1_steps", "learning_rate", "warmup_steps", "clip_norm", "beta_schedule", "t_max",
    "weight_noise", "weight_gradient", "weight_ema", "ema_decay", "histogram_bins",
    "histogram_sigma", "ema_voxels", "ema_gate_t", "seed",
)


def _validate(settings: SGCDSettings) -> None:
    """Reject settings that cannot train or sample, naming the parameter."""
    positive = ("res_blocks", "norm_groups", "head_channels", "space_to_channel",
                "stage1_steps", "t_max", "histogram_bins", "t_stop", "inversion_steps",
                "reverse_steps", "stage2_epochs", "last_k", "checkpoint_every")
    for name in positive:
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"sgcd needs {name} >= 1, got {getattr(settings, name)}")
    if len(settings.channels) < 2 or any(
            not 0 <= level < len(settings.channels) for level in settings.attention_levels):
        raise UsageError(f"sgcd needs at least 2 levels and attention_levels among 0 .. "
                         f"{len(settings.channels) - 1}, got {settings.attention_levels}")
    if any(c % settings.norm_groups for c in settings.channels):
        raise UsageError(f"sgcd channels {settings.channels} must be multiples of "
                         f"norm_groups {settings.norm_groups}")
    if settings.beta_schedule not in BETA_SCHEDULES:
        raise UsageError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                         f"got {settings.beta_schedule!r}")
    for name in ("t_max", "t_stop", "inference_t_stop"):
        if not 0 <= int(getattr(settings, name)) <= TRAINING_STEPS:
            raise UsageError(f"sgcd {name} must lie in 0 .. {TRAINING_STEPS}")
    if max(settings.inversion_steps, settings.reverse_steps) > settings.t_stop:
        raise UsageError("sgcd inversion_steps and reverse_steps must not exceed t_stop")
    if not 0.0 <= settings.ema_decay < 1.0:
        raise UsageError(f"sgcd ema_decay must lie in [0, 1), got {settings.ema_decay}")
    if not (settings.learning_rate > 0 and settings.stage2_learning_rate > 0
            and settings.histogram_sigma > 0):
        raise UsageError("sgcd learning rates and histogram_sigma must be > 0")
    for name in ("warmup_steps", "ema_voxels", "ema_gate_t", "psi_steps"):
        if int(getattr(settings, name)) < 0:
            raise UsageError(f"sgcd needs {name} >= 0, got {getattr(settings, name)}")
    backend, _ = parse_psi(settings.psi)
    if backend in TRAINED_PSI and settings.psi_steps < 1:
        raise UsageError(f"sgcd psi={settings.psi} is trained: it needs psi_steps >= 1")
    validate_device(settings.device)


def build_network(settings: SGCDSettings, classes: int) -> ConditionalDiffusionUNet:
    """The U-Net with weights initialised from ``settings.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return ConditionalDiffusionUNet(
            settings.channels,
            [level in settings.attention_levels for level in range(len(settings.channels))],
            settings.res_blocks, settings.norm_groups,
            settings.head_channels, classes, settings.space_to_channel,
        )


def load_network(settings: SGCDSettings, classes: int, state: dict[str, np.ndarray],
                 prefix: str, device: torch.device) -> ConditionalDiffusionUNet:
    network = build_network(settings, classes)
    network.load_state_dict(module_state(state, prefix))
    return network.to(device).eval()


# -- data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """One brain box in the network's terms: the image in [-1, 1] (background -1, sides
    padded to the net's divisor by the box), its brain mask, the normalised gradient map and
    the scale it was normalised by."""

    image: np.ndarray
    mask: np.ndarray
    condition: np.ndarray
    scale: float

    def to_device(self, device: torch.device) -> Prepared:
        return Prepared(*(torch.from_numpy(np.ascontiguousarray(a))[None, None].to(device)
                          for a in (self.image, self.mask, self.condition)),
                        self.scale)  # type: ignore[arg-type]


def prepare(image: Volume) -> Prepared:
    data = np.where(image.mask, 2.0 * image.data - 1.0, -1.0).astype(np.float32)
    gradient = gradient_map(torch.from_numpy(data)[None, None])
    scale = gradient_scale(gradient)
    return Prepared(data, image.mask.astype(bool),
                    (gradient / scale)[0, 0].numpy().astype(np.float32), float(scale))


def replace_image(prepared: Prepared, image: np.ndarray) -> Prepared:
    return Prepared(image, prepared.mask, prepared.condition, prepared.scale)


# -- losses and inference ------------------------------------------------------------------
def stage1_loss(network: ConditionalDiffusionUNet, record: EmaRecord, data: Prepared,
                label: int, abar: torch.Tensor, settings: SGCDSettings,
                generator: torch.Generator) -> torch.Tensor:
    """L_1 = L_N + L_G + L_E (weighted) on one image at a random t (Algorithm 1)."""
    image, mask, condition = data.image, data.mask, data.condition
    t = torch.randint(1, settings.t_max + 1, (1,), generator=generator)
    noise = torch.randn(image.shape, generator=generator).to(image.device)
    noisy = add_noise(image, noise, t.to(image.device), abar)
    classes = torch.tensor([label], device=image.device)
    eps = network(noisy, t.to(image.device), condition, classes)
    loss_noise = torch.mean((eps - noise) ** 2)
    clean = estimate_clean(noisy, eps, t.to(image.device), abar)
    loss_gradient = torch.mean((gradient_map(clean) / data.scale - condition) ** 2)
    loss = settings.weight_noise * loss_noise + settings.weight_gradient * loss_gradient
    gate = settings.ema_gate_t
    if settings.weight_ema and (gate == 0 or int(t) < gate):
        values = (clean[mask.bool()] + 1.0) / 2.0
        if settings.ema_voxels and values.numel() > settings.ema_voxels:
            pick = torch.randint(values.numel(), (settings.ema_voxels,), generator=generator)
            values = values[pick.to(values.device)]
        histogram = soft_histogram(values, settings.histogram_bins, settings.histogram_sigma)
        mean, std = values.mean(), values.std()
        record.update(label, histogram, mean, std)
        weight = 1.0 if gate == 0 else 1.0 - int(t) / gate
        loss = loss + settings.weight_ema * weight * record.loss(label, histogram, mean, std)
    return loss


@torch.no_grad()
def harmonize_unified(network: ConditionalDiffusionUNet, data: Prepared, label: int,
                      settings: SGCDSettings, t_stop: int, device: torch.device) -> np.ndarray:
    """Stage 1's output: inversion to ``t_stop`` and reverse diffusion, in [-1, 1]."""
    abar = alphas_cumprod(settings.beta_schedule)
    tensors = data.to_device(device)
    eps = eps_function(network, tensors.condition, label)
    steps_forward = min(settings.inversion_steps, t_stop)
    steps_reverse = min(settings.reverse_steps, t_stop)
    noisy = invert(eps, tensors.image, timestep_grid(t_stop, steps_forward), abar)
    out = reverse(eps, noisy, timestep_grid(t_stop, steps_reverse), abar)
    return np.where(data.mask, out[0, 0].cpu().numpy(), -1.0).astype(np.float32)


@torch.no_grad()
def translate(stage1: ConditionalDiffusionUNet, stage2: ConditionalDiffusionUNet,
              data: Prepared, unified: np.ndarray, label: int, settings: SGCDSettings,
              t_stop: int, device: torch.device) -> np.ndarray:
    """Stage 2's output: the unified image inverted with the stage-1 model and reversed with
    the fine-tuned one (Algorithm 2)."""
    abar = alphas_cumprod(settings.beta_schedule)
    condition = torch.from_numpy(data.condition)[None, None].to(device)
    start = torch.from_numpy(unified)[None, None].to(device)
    noisy = invert(eps_function(stage1, condition, label), start,
                   timestep_grid(t_stop, min(settings.inversion_steps, t_stop)), abar)
    out = reverse(eps_function(stage2, condition, label), noisy,
                  timestep_grid(t_stop, min(settings.reverse_steps, t_stop)), abar)
    return np.where(data.mask, out[0, 0].cpu().numpy(), -1.0).astype(np.float32)


def brain_values(data: Prepared) -> np.ndarray:
    return (data.image[data.mask] + 1.0) / 2.0


def target_wd_diagnostic(
    stage1: ConditionalDiffusionUNet, stage2: ConditionalDiffusionUNet,
    data: Sequence[Prepared], unified: Sequence[np.ndarray], labels: Sequence[int],
    sites: Sequence[str], target_site: str, label: int, settings: SGCDSettings,
    device: torch.device,
) -> np.ndarray:
    """(before, after): mean WD of a few source-site training images of one sequence to the
    target site's pooled brain intensities, un-harmonized and after stage 2."""
    target = np.concatenate([brain_values(d) for d, s, k in zip(data, sites, labels)
                             if s == target_site and k == label])
    chosen: list[int] = []
    for site in sorted(set(sites) - {target_site}):
        chosen += [i for i, (s, k) in enumerate(zip(sites, labels))
                   if s == site and k == label][:DIAGNOSTIC_IMAGES_PER_SITE]
    before, after = [], []
    for i in chosen:
        out = translate(stage1, stage2, data[i], unified[i], label, settings, settings.t_stop,
                        device)
        before.append(wasserstein(brain_values(data[i]), target))
        after.append(wasserstein(brain_values(replace_image(data[i], out)), target))
    if not chosen:
        return np.array([math.nan, math.nan])
    return np.array([np.mean(before), np.mean(after)], dtype=np.float64)
