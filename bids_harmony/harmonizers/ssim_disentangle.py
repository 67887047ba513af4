"""SSIM-guided disentanglement (paper 002): structure and style codes, site labels, a
style-agnostic output.

E_b encodes an image's anatomy (structure code c), E_s its style, split into a noise part n
and a site-label part l in {-1, 1}^K; the generator G(c, (n, l)) renders c in that style.
Training reconstructs an image from its own codes, translates it to another site's label
with random n and cycles back, with the SSIM terms as losses (reconstruction and cycle mix
SSIM with L1; the structure term keeps the translation's anatomy, the luminance term pulls its
local means towards an image of the label's site) beside AGUIT's adversarial, classification
and latent-regression losses. At inference a named target site sets its entry to +1 and the
others to -1 with n from E_s of the input; ``--target-site unified`` is the paper's
style-agnostic output: every entry -1 and n drawn once from the model's seed.

One model per sequence (its sites are the labels); the fit does not depend on the target
site, which only selects the label at inference, so the stage cache serves every target.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bids_harmony.errors import DataError, UsageError
from bids_harmony.harmonizers.base import UNIFIED, FittedState, TrainingSet
from bids_harmony.harmonizers.learned import (
    LOSS_HISTORY,
    BrainBox,
    LearnedHarmonizer,
    between_site_wd,
    machine_preset,
    monitor_arrays,
    resolve_settings,
    summarise_losses,
)
from bids_harmony.harmonizers.registry import register
from bids_harmony.metrics.similarity import psnr, wasserstein
from bids_harmony.nn import Monitor, TrainingState, checkpoint_path, fingerprint, train_state
from bids_harmony.nn import distributed
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.disentangle import Disentangler
from bids_harmony.nn.ssim import ssim_terms, window_radius
from bids_harmony.volume import Volume

LOGGER = logging.getLogger(__name__)

#: State keys: the inference networks' weights, the site order of the labels, the agnostic n.
NETWORK, SITE_LABELS, AGNOSTIC_NOISE = "net.", "site_labels", "agnostic_noise"
#: Prefixes of the per-term loss histories and of the monitor's scores during training.
TERM_PREFIX, PROGRESS_PREFIX = "term.", "progress."
#: The loss terms of one step, in the order they are logged (``d_total``: the critics').
TERMS = ("rec", "cycle", "struct", "lum", "style_cls", "latent", "adv", "cls_g",
         "structure_adv", "style_prior", "d_adv", "d_cls", "d_structure", "d_total")
#: Diagnostics: the between-site WD of the training images (source / agnostic output), the
#: source images' WD to the target site (before / after), the reconstruction PSNR.
SITE_WD_SOURCE, SITE_WD_AGNOSTIC = "site_wd_source", "site_wd_agnostic"
TARGET_WD_SOURCE, TARGET_WD_HARMONIZED = "target_wd_source", "target_wd_harmonized"
RECONSTRUCTION_PSNR = "reconstruction_psnr"
#: Below this a generator does not reproduce its own input: nothing it renders can be trusted.
MIN_RECONSTRUCTION_PSNR = 20.0
#: Training images per site the diagnostics and the sample mosaics use.
DIAGNOSTIC_IMAGES_PER_SITE = 2
#: Settings that change no weight (left out of the fingerprint).
NOT_IN_FINGERPRINT = ("device", "checkpoint_every", "monitor_every")
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class DisentangleSettings:
    """Everything that defines a model. The paper states none of it; our choices:

    Networks (:mod:`bids_harmony.nn.disentangle`): ``width`` channels at full resolution
    (the structure code has twice that at half resolution), style noise of ``noise_size``
    (nz), ``blocks`` residual blocks in E_b and G.

    Training: ``steps`` updates of G/E and of the critics, each on ``batch`` pairs of random
    ``crop``^3 blocks (0, or a box side shorter than ``crop``: the whole side) taken at one
    position in both images of a pair; Adam at ``learning_rate`` (G/E) and
    ``critic_learning_rate`` with betas (``adam_beta1``, 0.999), gradient norm clipped at
    ``clip_norm``. Loss weights (DISARM++'s where it has a counterpart): reconstruction
    ``weight_rec`` and cycle ``weight_cycle`` (each lambda = ``ssim_mix`` of 1 - SSIM plus
    1 - lambda of L1, SSIM with exponents ``ssim_alpha``/``ssim_beta``/``ssim_gamma``),
    ``weight_struct``, ``weight_lum``, the style
    encoder's label ``weight_style_cls``, latent regression ``weight_latent``, image
    adversarial ``weight_adv``, classification of translations ``weight_cls_g`` and of real
    images ``weight_cls_d``, the structure code's site adversary ``weight_structure_adv``,
    and ``weight_style_prior`` (an L2 pull of E_s's n towards N(0, 1), DISARM's KL 0.01).
    ``unlabelled_fraction`` of the training images is treated as unlabelled (the paper's
    semi-supervised x_u; 0: every image has its site, as in this app).

    Every ``monitor_every`` steps: reconstruction PSNR and agnostic between-site WD on a few
    training images, and a sample mosaic in the work directory.
    """

    width: int
    noise_size: int
    blocks: int
    crop: int
    batch: int
    steps: int
    learning_rate: float = 1e-4
    critic_learning_rate: float = 1e-4
    adam_beta1: float = 0.5
    clip_norm: float = 1.0
    weight_rec: float = 10.0
    weight_cycle: float = 10.0
    weight_struct: float = 1.0
    weight_lum: float = 1.0
    weight_style_cls: float = 1.0
    weight_latent: float = 8.0
    weight_adv: float = 1.0
    weight_cls_g: float = 10.0
    weight_cls_d: float = 3.0
    weight_structure_adv: float = 1.0
    weight_style_prior: float = 0.01
    ssim_mix: float = 0.5
    ssim_alpha: float = 1.0
    ssim_beta: float = 1.0
    ssim_gamma: float = 1.0
    unlabelled_fraction: float = 0.0
    monitor_every: int = 250
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100


#: ``tiny``: tests, seconds on 24^3 phantoms. ``cpu``: the default without a GPU, 16
#: channels, nz 8, 1,500 steps on 48^3 crops, batch 2 (40 min on 2 cores measured; lr 2e-4,
#: twice DISARM's, since a CPU run has 1/100 of its iterations). ``fast``: a GPU run on the
#: whole brain box. ``paper``: DISARM++'s width 48 and nz 16 and its iteration cap.
PRESETS: dict[str, DisentangleSettings] = {
    "tiny": DisentangleSettings(4, 4, 1, 24, 2, 20, learning_rate=1e-3,
                                critic_learning_rate=1e-3, monitor_every=10,
                                checkpoint_every=10),
    "cpu": DisentangleSettings(16, 8, 2, 48, 2, 1500, learning_rate=2e-4,
                               critic_learning_rate=2e-4),
    "fast": DisentangleSettings(32, 16, 4, 0, 2, 20_000, monitor_every=1000,
                                checkpoint_every=500),
    "paper": DisentangleSettings(48, 16, 4, 0, 2, 200_000, monitor_every=5000,
                                 checkpoint_every=2000),
}
#: Measured seconds per step on 2 CPU cores, for the time logged before training.
CPU_SECONDS_PER_STEP = {"cpu": 1.6, "tiny": 0.05}


@register("ssim_disentangle")
class SSIMDisentangle(LearnedHarmonizer):
    """SSIM-guided disentanglement: structure and style codes with site labels; translation
    to a named site or a style-agnostic output.

    ``preset`` sets every field of :class:`DisentangleSettings`; keyword overrides replace
    single fields. Choices the paper leaves open (its code is not public; DISARM++, its
    predecessor, and AGUIT's paper are the references):

    * Images enter in [0, 1] with background 0 on the brain box of the training masks
      (sides even); SSIM uses data range 1, sigma 1.5, C1, C2 and C3 = C2 / 2 of
      :mod:`bids_harmony.metrics.similarity`, averaged inside the brain mask of the crop.
    * Every image is labelled, so each serves as x_u and, for another pair, as x_l; x_l
      is drawn from a site other than x_u's, so every translation changes the label. With
      ``unlabelled_fraction``, those images' labels come from E_s (tanh of its logits) and
      they take no classification loss.
    * L_lum compares the translation with x_l, another head at the same template position
      (images are in MNI space), inside both brain masks.
    * Adversarial losses are least squares (DISARM++ uses BCE; LSGAN is steadier over a short
      run); classification losses are binary cross-entropy per label entry, the
      {-1, 1}^K labels read as {0, 1}. The structure adversary (D_p^b) is trained to name the
      site from c, and E_b to leave it at 0.5 for every entry; AGUIT's D_a^b, which tells
      labelled from unlabelled codes, is left out: with every image labelled it has nothing
      to separate.
    * The critics update first on the step's translations, then G/E against the updated
      critics. Under ``torchrun`` the gradients are averaged by hand
      (:func:`bids_harmony.nn.distributed.average_gradients`): the cycle calls G twice per
      backward pass, which a DDP wrapper refuses.
    * The agnostic n is drawn once at fit from ``seed`` and stored with the model, so every
      participant job renders the same style.
    """

    citation = ("Caldera, Cavinato, Ieva. Scanner-agnostic MRI harmonization via SSIM-guided "
                "disentanglement. MOX-Report 19/2026.")
    presets: ClassVar[tuple[str, ...]] = ("auto", *PRESETS)
    loss_label: ClassVar[str] = "G/E loss (weighted sum)"

    def __init__(self, preset: str = "auto", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        preset = machine_preset(preset, overrides.get("device", "auto"))
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **asdict(settings))

    # -- contract --------------------------------------------------------------------------
    def _fit_sequences(self, training: TrainingSet) -> FittedState:
        settings = self.settings
        device = resolve_device(settings.device)
        per_sequence = {}
        for sequence in sorted(training.images):
            images, sites = list(training.images[sequence]), list(training.sites[sequence])
            labels = sorted(set(sites))
            if len(labels) < 2:
                raise DataError(
                    f"ssim_disentangle learns the differences between sites, but every "
                    f"{sequence} image is from site '{labels[0]}'; add images of other sites "
                    "or choose a single-site method (e.g. --method histmatch)")
            box = BrainBox.around([im.mask for im in images], [2, 2, 2])
            crops = [box.crop(im) for im in images]
            data = [Prepared.of(c) for c in crops]
            key = fingerprint(
                {**{k: v for k, v in asdict(settings).items() if k not in NOT_IN_FINGERPRINT},
                 "sequence": sequence, "sites": sites},
                [d.image for d in data])
            self._announce(settings.steps, CPU_SECONDS_PER_STEP.get(self.params["preset"]))
            trained = self._stage(f"train-{sequence}", key, lambda: self._train(
                data, sites, labels, sequence, key, device))
            model = load_model(settings, len(labels), trained, device)
            state = dict(trained)
            state.update(box.to_state())
            state[SITE_LABELS] = _encode(labels)
            state[AGNOSTIC_NOISE] = agnostic_noise(settings)
            diagnostics = fit_diagnostics(model, data, sites, labels, training.target_site,
                                          state[AGNOSTIC_NOISE], device)
            history = {"step": settings.steps, **diagnostics["final"]}
            state.update(monitor_arrays([history], diagnostics["baselines"], held_out=False))
            per_sequence[sequence] = state
        return FittedState(per_sequence)

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """A generator that cannot reproduce its input, an agnostic output that leaves the
        sites as far apart as before, or a translation no closer to the target site than
        the source, learned nothing."""
        final, baselines = diagnostics["history"][-1], diagnostics["baselines"]
        warnings = []
        if final.get(RECONSTRUCTION_PSNR, math.inf) < MIN_RECONSTRUCTION_PSNR:
            warnings.append(
                f"the generator reproduces its input at {final[RECONSTRUCTION_PSNR]:.1f} dB "
                f"PSNR (below {MIN_RECONSTRUCTION_PSNR:.0f}): it has not learned to render "
                "anatomy; train longer (steps) or on a GPU (--preset fast)")
        if SITE_WD_AGNOSTIC in final and final[SITE_WD_AGNOSTIC] >= baselines[SITE_WD_SOURCE]:
            warnings.append(
                f"the style-agnostic output leaves the sites {final[SITE_WD_AGNOSTIC]:.4f} "
                f"apart (WD between sites, {diagnostics['scored_on']} images), no closer than "
                f"before ({baselines[SITE_WD_SOURCE]:.4f}): the style is not disentangled")
        if TARGET_WD_HARMONIZED in final and final[TARGET_WD_HARMONIZED] >= baselines[
                TARGET_WD_SOURCE]:
            warnings.append(
                f"translations are {final[TARGET_WD_HARMONIZED]:.4f} from the target site "
                f"(WD), no closer than un-harmonized ({baselines[TARGET_WD_SOURCE]:.4f}): it "
                "has not learned the target style")
        return warnings

    def _add_to_card(self, card: dict[str, Any], staging: Path) -> None:
        """The per-term loss curves (thinned) and a plot of them per sequence."""
        super()._add_to_card(card, staging)
        card["loss_terms"] = self.loss_terms()
        for sequence, seq_state in self.state_.items():
            terms = {name[len(TERM_PREFIX):]: value for name, value in seq_state.items()
                     if name.startswith(TERM_PREFIX)}
            plot_terms(terms, f"SSIM disentanglement, {sequence}",
                       staging / f"loss_terms_{sequence}.png")
            card.setdefault("site_labels", {})[sequence] = _decode(seq_state[SITE_LABELS])
            progress = {name[len(PROGRESS_PREFIX):]: np.asarray(value).tolist()
                        for name, value in seq_state.items() if name.startswith(PROGRESS_PREFIX)}
            card.setdefault("training_progress", {})[sequence] = [
                {name: (int(values[k]) if name == "step" else round(float(values[k]), 6))
                 for name, values in progress.items()}
                for k in range(len(progress.get("step", [])))]

    def loss_terms(self) -> dict[str, dict[str, dict[str, list[float]]]]:
        """Per sequence, each loss term's thinned curve (``step``, ``loss``)."""
        self._check_fitted()
        curves: dict[str, dict[str, dict[str, list[float]]]] = {}
        for sequence, seq_state in self.state_.items():
            curves[sequence] = {}
            for name, values in seq_state.items():
                if name.startswith(TERM_PREFIX):
                    steps, losses = summarise_losses(values)
                    curves[sequence][name[len(TERM_PREFIX):]] = {"step": steps, "loss": losses}
        return curves

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        device = resolve_device(self.settings.device)
        labels = _decode(state[SITE_LABELS])
        box = BrainBox.from_state(state)
        model = load_model(self.settings, len(labels), state, device)
        data = Prepared.of(box.crop(image))
        noise = (torch.from_numpy(np.array(state[AGNOSTIC_NOISE]))
                 if self.target_site_ == UNIFIED else None)
        out = translate(model, data.image, data.mask,
                        target_label(labels, self.target_site_), device, noise)
        return box.uncrop(np.where(data.mask, out, 0.0).astype(np.float32))

    # -- training --------------------------------------------------------------------------
    def _train(self, data: Sequence[Prepared], sites: Sequence[str], labels: Sequence[str],
               sequence: str, key: str, device: torch.device) -> dict[str, np.ndarray]:
        settings = self.settings
        model = build_model(settings, len(labels)).to(device)
        betas = (settings.adam_beta1, 0.999)
        generator_side, critic_side = model.generator_side(), model.discriminator_side()
        optimiser = torch.optim.Adam(generator_side, lr=settings.learning_rate, betas=betas)
        critic_optimiser = torch.optim.Adam(critic_side, lr=settings.critic_learning_rate,
                                            betas=betas)
        sampler = PairSampler(data, sites, labels, settings)
        term_log: dict[str, list[float]] = {name: [] for name in TERMS}

        def step(generator: torch.Generator) -> float:
            batch = sampler.draw(generator, device)
            terms = training_step(model, batch, settings, generator, optimiser,
                                  critic_optimiser, generator_side, critic_side)
            for name in TERMS:
                term_log[name].append(terms[name])
            return terms["total"]

        monitor = Monitor(self._monitor(model, data, sites, labels, sequence, device),
                          every=settings.monitor_every)
        state = TrainingState({"model": model},
                              {"generator": optimiser, "critics": critic_optimiser})
        losses = train_state(
            state, step, settings.steps, torch.Generator().manual_seed(settings.seed),
            monitor=monitor, checkpoint=checkpoint_path(self.checkpoint_dir,
                                                        f"ssim_disentangle-{key}"),
            checkpoint_every=settings.checkpoint_every,
            description=f"ssim_disentangle {sequence}", term_log=term_log,
        )
        arrays = inference_arrays(model)
        arrays[LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
        for name, values in term_log.items():
            arrays[TERM_PREFIX + name] = np.asarray(values, dtype=np.float32)
        arrays.update({PROGRESS_PREFIX + name: np.asarray(
            [record[name] for record in monitor.history], dtype=np.float64)
            for name in dict.fromkeys(k for record in monitor.history for k in record)})
        return arrays

    def _monitor(self, model: Disentangler, data: Sequence[Prepared], sites: Sequence[str],
                 labels: Sequence[str], sequence: str,
                 device: torch.device) -> Callable[[], dict[str, float]]:
        """Scores of a few training images (their reconstruction PSNR and the agnostic
        output's between-site WD) and, with a work directory, a sample mosaic."""
        chosen = diagnostic_images(sites, labels, 1)
        noise = agnostic_noise(self.settings)
        samples = None if self.checkpoint_dir is None else self.checkpoint_dir / SAMPLES_DIR
        calls = {"count": 0}

        def evaluate() -> dict[str, float]:
            calls["count"] += 1
            scores, reconstructions, agnostic = own_and_agnostic(model, data, sites, labels,
                                                                 chosen, noise, device)
            rows = []
            for i, reconstruction, free in zip(chosen, reconstructions, agnostic):
                image, brain = data[i].image, data[i].mask
                outputs = [
                    reconstruction if site == sites[i] else np.where(
                        brain, translate(model, image, brain, target_label(labels, site),
                                         device), 0.0)
                    for site in labels]
                rows.append([image, reconstruction, *outputs, free])
            if samples is not None and distributed.is_main():
                samples.mkdir(parents=True, exist_ok=True)
                plot_mosaic(rows, ["input", "reconstruction", *labels, "agnostic"],
                            [sites[i] for i in chosen],
                            samples / f"ssim_disentangle-{sequence}-{calls['count']:03d}.png")
            return scores

        return evaluate


# -- settings and networks -----------------------------------------------------------------
def _validate(settings: DisentangleSettings) -> None:
    """Reject settings that cannot train, naming the parameter."""
    for name in ("width", "noise_size", "blocks", "batch", "steps", "monitor_every",
                 "checkpoint_every"):
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"ssim_disentangle needs {name} >= 1, got "
                             f"{getattr(settings, name)}")
    smallest = 2 * window_radius() + 2
    if settings.crop and (settings.crop < smallest or settings.crop % 2):
        raise UsageError(f"ssim_disentangle crop must be 0 (the whole brain box) or an even "
                         f"side >= {smallest} (the SSIM window), got {settings.crop}")
    if not (settings.learning_rate > 0 and settings.critic_learning_rate > 0):
        raise UsageError("ssim_disentangle learning rates must be > 0")
    if not 0.0 <= settings.ssim_mix <= 1.0:
        raise UsageError(f"ssim_disentangle ssim_mix must lie in [0, 1], got {settings.ssim_mix}")
    for name in ("unlabelled_fraction", "adam_beta1"):
        if not 0.0 <= float(getattr(settings, name)) < 1.0:
            raise UsageError(f"ssim_disentangle {name} must lie in [0, 1), got "
                             f"{getattr(settings, name)}")
    weights = [name for name in asdict(settings) if name.startswith(("weight_", "ssim_"))]
    negative = [name for name in weights if float(getattr(settings, name)) < 0]
    if negative or settings.clip_norm < 0:
        raise UsageError(f"ssim_disentangle {', '.join(negative) or 'clip_norm'} must be >= 0")
    validate_device(settings.device)


def build_model(settings: DisentangleSettings, sites: int) -> Disentangler:
    """The networks with weights initialised from ``settings.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return Disentangler(settings.width, settings.noise_size, sites, settings.blocks)


#: The submodules inference needs (the critics are dropped from the saved model).
INFERENCE_PARTS = ("structure", "style", "generator")


def inference_arrays(model: Disentangler) -> dict[str, np.ndarray]:
    return {NETWORK + name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()
            if name.split(".", 1)[0] in INFERENCE_PARTS}


def load_model(settings: DisentangleSettings, sites: int, state: dict[str, np.ndarray],
               device: torch.device) -> Disentangler:
    model = build_model(settings, sites)
    weights = {name[len(NETWORK):]: torch.from_numpy(np.array(value))
               for name, value in state.items() if name.startswith(NETWORK)}
    missing = [name for name in model.state_dict()
               if name.split(".", 1)[0] in INFERENCE_PARTS and name not in weights]
    if missing:
        raise DataError(f"the ssim_disentangle state lacks {len(missing)} weights "
                        f"(e.g. {missing[0]}); refit the model at the group level")
    model.load_state_dict(weights, strict=False)
    return model.to(device).eval()


def agnostic_noise(settings: DisentangleSettings) -> np.ndarray:
    """The style-agnostic output's n ~ N(0, 1), drawn from the model's seed alone."""
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randn(settings.noise_size, generator=generator).numpy().astype(np.float32)


def target_label(labels: Sequence[str], target: str) -> np.ndarray:
    """l in {-1, 1}^K: +1 at ``target``, -1 elsewhere; every entry -1 for ``unified``."""
    if target != UNIFIED and target not in labels:
        raise DataError(f"target site '{target}' is not one of the sites the model learned "
                        f"({', '.join(labels)}); refit with it or choose one of them")
    return np.array([1.0 if site == target else -1.0 for site in labels], dtype=np.float32)


def _encode(labels: Sequence[str]) -> np.ndarray:
    return np.frombuffer(json.dumps(list(labels)).encode(), dtype=np.uint8).copy()


def _decode(array: np.ndarray) -> list[str]:
    return list(json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode()))


# -- data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """One brain box: intensities in [0, 1] with background 0, and its brain mask."""

    image: np.ndarray
    mask: np.ndarray

    @classmethod
    def of(cls, image: Volume) -> Prepared:
        mask = image.mask.astype(bool)
        return cls(np.where(mask, np.clip(image.data, 0.0, 1.0), 0.0).astype(np.float32), mask)


def _even(side: int) -> int:
    """``side`` rounded down to even: the structure code halves it, G doubles it back."""
    return side - side % 2


@dataclass(frozen=True)
class Batch:
    """``batch`` pairs of crops (N, 1, c, c, c): x_u and x_l with their masks, their labels
    in {-1, 1}^K, and whether x_u's label may be used."""

    source: torch.Tensor
    source_mask: torch.Tensor
    source_label: torch.Tensor
    labelled: torch.Tensor
    other: torch.Tensor
    other_mask: torch.Tensor
    other_label: torch.Tensor


class PairSampler:
    """Random (x_u, x_l) pairs: x_u any image, x_l an image of another site, both cropped at
    one random position of the box. With ``unlabelled_fraction``, a seeded choice of images
    is unlabelled (never an x_l)."""

    def __init__(self, data: Sequence[Prepared], sites: Sequence[str], labels: Sequence[str],
                 settings: DisentangleSettings) -> None:
        self.images = [torch.from_numpy(d.image) for d in data]
        self.masks = [torch.from_numpy(d.mask) for d in data]
        self.labels = [torch.from_numpy(target_label(labels, s)) for s in sites]
        hidden = int(settings.unlabelled_fraction * len(data))
        order = np.random.default_rng(settings.seed).permutation(len(data))
        self.labelled = np.ones(len(data), dtype=bool)
        self.labelled[order[:hidden]] = False
        #: Per image, the labelled images of the other sites: its x_l candidates.
        self.partners = [[i for i in range(len(data)) if sites[i] != site and self.labelled[i]]
                         for site in sites]
        self.settings = settings
        self.shape = data[0].image.shape

    def draw(self, generator: torch.Generator, device: torch.device) -> Batch:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in Batch.__dataclass_fields__}
        crop = self.settings.crop
        for _ in range(self.settings.batch):
            u = int(torch.randint(len(self.images), (1,), generator=generator))
            others = self.partners[u]
            if not others:
                raise DataError("ssim_disentangle needs labelled images of at least two sites")
            v = others[int(torch.randint(len(others), (1,), generator=generator))]
            sides = [_even(min(crop, side) if crop else side) for side in self.shape]
            start = [int(torch.randint(side - size + 1, (1,), generator=generator))
                     for side, size in zip(self.shape, sides)]
            index = tuple(slice(a, a + size) for a, size in zip(start, sides))
            parts["source"].append(self.images[u][index])
            parts["source_mask"].append(self.masks[u][index])
            parts["source_label"].append(self.labels[u])
            parts["labelled"].append(torch.tensor(bool(self.labelled[u])))
            parts["other"].append(self.images[v][index])
            parts["other_mask"].append(self.masks[v][index])
            parts["other_label"].append(self.labels[v])
        volumes = {"source", "source_mask", "other", "other_mask"}
        return Batch(**{name: (torch.stack(values)[:, None] if name in volumes
                               else torch.stack(values)).to(device)
                        for name, values in parts.items()})


# -- losses --------------------------------------------------------------------------------
def _mixed(settings: DisentangleSettings, output: torch.Tensor, target: torch.Tensor,
           mask: torch.Tensor) -> torch.Tensor:
    """lambda (1 - SSIM) + (1 - lambda) L1 (paper 002, the reconstruction and cycle losses)."""
    exponents = (settings.ssim_alpha, settings.ssim_beta, settings.ssim_gamma)
    similarity = ssim_terms(output, target, mask, exponents=exponents)["ssim"]
    return (settings.ssim_mix * (1.0 - similarity)
            + (1.0 - settings.ssim_mix) * torch.mean(torch.abs(output - target)))


def _as_targets(label: torch.Tensor) -> torch.Tensor:
    return (label + 1.0) / 2.0


def _labelled_bce(logits: torch.Tensor, label: torch.Tensor, keep: torch.Tensor
                  ) -> torch.Tensor:
    """BCE of the label logits on the kept rows (0 when none is kept)."""
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep], _as_targets(label[keep]))


def forward_pass(model: Disentangler, batch: Batch, generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Reconstruction, translation to x_l's label with random n, and the cycle back
    (paper 002, Sec. 2.3), with the codes the losses need."""
    code = model.structure(batch.source)
    noise, logits = model.style(batch.source, batch.source_mask)
    own = torch.where(batch.labelled[:, None], batch.source_label, torch.tanh(logits))
    random_noise = torch.randn(noise.shape, generator=generator).to(noise.device)
    translation = model.generator(code, random_noise, batch.other_label)
    cycle_noise, _ = model.style(translation, batch.source_mask)
    return {
        "code": code, "noise": noise, "logits": logits, "random_noise": random_noise,
        "reconstruction": model.generator(code, noise, own), "translation": translation,
        "cycle_noise": cycle_noise,
        "cycle": model.generator(model.structure(translation), noise, own),
    }


def critic_terms(model: Disentangler, batch: Batch, forward: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The critics' losses: real images against the (detached) translation, the real
    images' sites, and the site from the (detached) structure code."""
    real_score, real_sites = model.image_critic(torch.cat([batch.source, batch.other]),
                                                torch.cat([batch.source_mask, batch.other_mask]))
    fake_score, _ = model.image_critic(forward["translation"].detach(), batch.source_mask)
    labels = torch.cat([batch.source_label, batch.other_label])
    keep = torch.cat([batch.labelled, torch.ones_like(batch.labelled)])
    return {
        "d_adv": 0.5 * (torch.mean((real_score - 1.0) ** 2) + torch.mean(fake_score ** 2)),
        "d_cls": _labelled_bce(real_sites, labels, keep),
        "d_structure": _labelled_bce(model.structure_critic(forward["code"].detach()),
                                     batch.source_label, batch.labelled),
    }


def generator_terms(model: Disentangler, batch: Batch, forward: dict[str, torch.Tensor],
                    settings: DisentangleSettings) -> dict[str, torch.Tensor]:
    """E_b's, E_s's and G's loss terms (unweighted)."""
    mask, both = batch.source_mask, batch.source_mask & batch.other_mask
    reconstruction, translation = forward["reconstruction"], forward["translation"]
    fake_score, fake_sites = model.image_critic(translation, mask)
    return {
        "rec": _mixed(settings, reconstruction, batch.source, mask),
        "cycle": _mixed(settings, forward["cycle"], batch.source, mask),
        "struct": 1.0 - ssim_terms(reconstruction, translation, mask)["structure"],
        "lum": 1.0 - ssim_terms(batch.other, translation, both)["luminance"],
        "style_cls": _labelled_bce(forward["logits"], batch.source_label, batch.labelled),
        "latent": torch.mean(torch.abs(forward["cycle_noise"] - forward["random_noise"])),
        "adv": torch.mean((fake_score - 1.0) ** 2),
        "cls_g": F.binary_cross_entropy_with_logits(fake_sites, _as_targets(batch.other_label)),
        "structure_adv": F.binary_cross_entropy_with_logits(
            model.structure_critic(forward["code"]), torch.full_like(batch.source_label, 0.5)),
        "style_prior": 0.5 * torch.mean(forward["noise"] ** 2),
    }


def term_weights(settings: DisentangleSettings) -> dict[str, float]:
    """Each loss term's weight (``weight_<term>``; the critics' adversarial term shares G's)."""
    return {"rec": settings.weight_rec, "cycle": settings.weight_cycle,
            "struct": settings.weight_struct, "lum": settings.weight_lum,
            "style_cls": settings.weight_style_cls, "latent": settings.weight_latent,
            "adv": settings.weight_adv, "cls_g": settings.weight_cls_g,
            "structure_adv": settings.weight_structure_adv,
            "style_prior": settings.weight_style_prior, "d_adv": settings.weight_adv,
            "d_cls": settings.weight_cls_d, "d_structure": settings.weight_structure_adv}


def training_step(model: Disentangler, batch: Batch, settings: DisentangleSettings,
                  generator: torch.Generator, optimiser: torch.optim.Optimizer,
                  critic_optimiser: torch.optim.Optimizer,
                  generator_side: list[torch.nn.Parameter],
                  critic_side: list[torch.nn.Parameter]) -> dict[str, float]:
    """One update of the critics on this step's translations, then one of E_b, E_s and G
    against the updated critics; every loss term's value, ``d_total`` and ``total``."""
    weights = term_weights(settings)
    forward = forward_pass(model, batch, generator)
    critic_optimiser.zero_grad(set_to_none=True)
    critics = critic_terms(model, batch, forward)
    d_total = sum(weights[name] * value for name, value in critics.items())
    d_total.backward()
    _update(critic_optimiser, critic_side, settings.clip_norm)
    terms = generator_terms(model, batch, forward, settings)
    total = sum(weights[name] * value for name, value in terms.items())
    optimiser.zero_grad(set_to_none=True)
    total.backward()
    _update(optimiser, generator_side, settings.clip_norm)
    values = {name: float(value.detach()) for name, value in {**terms, **critics}.items()}
    values.update(d_total=float(d_total.detach()), total=float(total.detach()))
    return values


def _update(optimiser: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
            clip_norm: float) -> None:
    distributed.average_gradients(parameters)
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    optimiser.step()


# -- inference and diagnostics -------------------------------------------------------------
@torch.no_grad()
def translate(model: Disentangler, image: np.ndarray, mask: np.ndarray, label: np.ndarray,
              device: torch.device, noise: torch.Tensor | None = None) -> np.ndarray:
    """G(E_b(x), (n, l)) on a whole box in [0, 1]; n from E_s(x) unless given. An odd side
    (a box that took a whole odd grid side) is padded by one background voxel and cut back."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    padding = [p for side in reversed(image.shape) for p in (0, side % 2)]
    x = F.pad(x, padding)
    brain = F.pad(torch.from_numpy(np.ascontiguousarray(mask))[None, None].to(device), padding)
    n = model.style(x, brain)[0] if noise is None else noise.reshape(1, -1).to(device)
    out = model.generator(model.structure(x), n, torch.from_numpy(label)[None].to(device))
    depth, height, width = image.shape
    return torch.clamp(out, 0.0, 1.0)[0, 0, :depth, :height, :width].cpu().numpy()


def diagnostic_images(sites: Sequence[str], labels: Sequence[str], per_site: int) -> list[int]:
    """The first ``per_site`` training images of each site."""
    return [i for site in labels for i in [k for k, s in enumerate(sites) if s == site][
        :per_site]]


def own_and_agnostic(model: Disentangler, data: Sequence[Prepared], sites: Sequence[str],
                     labels: Sequence[str], chosen: Sequence[int], noise: np.ndarray,
                     device: torch.device) -> tuple[dict[str, float], list[np.ndarray],
                                                    list[np.ndarray]]:
    """The ``chosen`` images rendered with their own label (the reconstruction) and in the
    agnostic style: the mean reconstruction PSNR and the agnostic between-site WD, with both
    renderings (0 outside the brain)."""
    agnostic_label = target_label(labels, UNIFIED)
    reconstructions, agnostic = [], []
    for i in chosen:
        image, brain = data[i].image, data[i].mask
        own = translate(model, image, brain, target_label(labels, sites[i]), device)
        free = translate(model, image, brain, agnostic_label, device, torch.from_numpy(noise))
        reconstructions.append(np.where(brain, own, 0.0))
        agnostic.append(np.where(brain, free, 0.0))
    scores = {
        RECONSTRUCTION_PSNR: float(np.mean([psnr(r, data[i].image, data[i].mask)
                                            for r, i in zip(reconstructions, chosen)])),
        SITE_WD_AGNOSTIC: between_site_wd([a[data[i].mask] for a, i in zip(agnostic, chosen)],
                                          [sites[i] for i in chosen]),
    }
    return scores, reconstructions, agnostic


def fit_diagnostics(model: Disentangler, data: Sequence[Prepared], sites: Sequence[str],
                    labels: Sequence[str], target_site: str, noise: np.ndarray,
                    device: torch.device) -> dict[str, dict[str, float]]:
    """On a few training images per site: reconstruction PSNR, between-site WD before and
    after the agnostic output, and (for a named target) the source images' WD to the target
    site's pooled intensities before and after translation."""
    chosen = diagnostic_images(sites, labels, DIAGNOSTIC_IMAGES_PER_SITE)
    final, _, _ = own_and_agnostic(model, data, sites, labels, chosen, noise, device)
    baselines = {SITE_WD_SOURCE: between_site_wd([data[i].image[data[i].mask] for i in chosen],
                                                 [sites[i] for i in chosen])}
    if target_site != UNIFIED:
        target = np.concatenate([d.image[d.mask] for d, s in zip(data, sites) if s == target_site])
        label = target_label(labels, target_site)
        before, after = [], []
        for i in (i for i in chosen if sites[i] != target_site):
            out = translate(model, data[i].image, data[i].mask, label, device)
            before.append(wasserstein(data[i].image[data[i].mask], target))
            after.append(wasserstein(out[data[i].mask], target))
        baselines[TARGET_WD_SOURCE] = float(np.mean(before))
        final[TARGET_WD_HARMONIZED] = float(np.mean(after))
    return {"final": final, "baselines": baselines}


# -- pictures ------------------------------------------------------------------------------
def plot_mosaic(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[str],
                names: Sequence[str], path: Path) -> None:
    """The middle axial slice of each volume: one row per image, one column per output."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.6 * len(columns), 1.8 * len(rows)))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, volume in enumerate(row):
            axis = axes[r][c]
            axis.imshow(np.rot90(volume[:, :, volume.shape[2] // 2]), cmap="gray", vmin=0,
                        vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(columns[c], fontsize=7)
        axes[r][0].set_ylabel(names[r], fontsize=7)
    figure.tight_layout()
    with path.open("wb") as handle:
        figure.savefig(handle, format="png", dpi=80)


def plot_terms(terms: dict[str, np.ndarray], title: str, path: Path) -> None:
    """Each loss term's running mean over the steps, on one log axis."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for name, values in terms.items():
        values = np.asarray(values, dtype=np.float64)
        window = max(1, values.size // 50)
        running = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(np.arange(window, values.size + 1), np.maximum(running, 1e-6), lw=1,
                  label=name)
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("loss term (running mean)")
    axis.set_title(title)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
