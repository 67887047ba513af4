"""The shared training loop: checkpoints, exact resume after an interruption (one network,
and several with their optimisers and an EMA), fingerprints, the stage cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bids_harmony.nn.stages import run_stage, stage_path
from bids_harmony.nn.training import (
    Monitor,
    StepLoss,
    TrainingState,
    checkpoint_path,
    fingerprint,
    train,
    train_state,
    warmup_schedule,
)

STEPS = 10
CHECKPOINT_EVERY = 3


class Run:
    """A small regression network with Adam and a step schedule, all seeded identically."""

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.network = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1)
            )
        self.optimiser = torch.optim.Adam(self.network.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimiser, 4, gamma=0.5)
        self.generator = torch.Generator().manual_seed(1)
        self.calls = 0

    def step_loss(self, generator: torch.Generator) -> torch.Tensor:
        """Mean squared error on a fresh batch drawn from ``generator`` alone."""
        self.calls += 1
        inputs = torch.randn(16, 4, generator=generator)
        targets = inputs.sum(1, keepdim=True) + 0.1 * torch.randn(16, 1, generator=generator)
        return torch.mean((self.network(inputs) - targets) ** 2)

    def train(self, checkpoint: Path | None, step_loss: StepLoss | None = None) -> list[float]:
        return train(
            self.network, self.optimiser, step_loss or self.step_loss, STEPS, self.generator,
            scheduler=self.scheduler, checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY,
        )


def interrupted_at(run: Run, call: int) -> StepLoss:
    """``run.step_loss`` that stops the process (as Ctrl-C would) at its ``call``-th call."""

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        if run.calls + 1 == call:
            raise KeyboardInterrupt
        return run.step_loss(generator)

    return step_loss


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, left), right in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(left, right), name


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    reference = Run()
    expected = reference.train(checkpoint=None)
    checkpoint = tmp_path / "run.pt"

    interrupted = Run()
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(checkpoint, interrupted_at(interrupted, call=8))
    assert checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True)["step"] == 6
    assert not list(tmp_path.glob(".*partial*"))

    resumed = Run()
    losses = resumed.train(checkpoint)
    assert resumed.calls == STEPS - 6  # steps saved in the checkpoint are not repeated
    assert losses == expected
    assert_same_weights(resumed.network, reference.network)
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert not checkpoint.exists()
    assert not resumed.network.training


class StabilisedRun(Run):
    """:class:`Run` with warm-up, gradient clipping, an EMA of the weights and a monitor
    that scores the EMA copy on fixed held-out data."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = warmup_schedule(self.optimiser, 4, STEPS, decay="cosine")
        self.ema = AveragedModel(self.network, multi_avg_fn=get_ema_multi_avg_fn(0.8))
        held_out = torch.randn(32, 4, generator=torch.Generator().manual_seed(9))

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                error = self.ema.module(held_out) - held_out.sum(1, keepdim=True)
            return {"mse": float(error.pow(2).mean())}

        self.monitor = Monitor(evaluate, every=4)

    def train(self, checkpoint: Path | None, step_loss: StepLoss | None = None) -> list[float]:
        return train(
            self.network, self.optimiser, step_loss or self.step_loss, STEPS, self.generator,
            scheduler=self.scheduler, clip_norm=0.5, ema=self.ema, monitor=self.monitor,
            checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY,
        )


def test_a_checkpoint_of_the_one_process_format_resumes_exactly(tmp_path: Path) -> None:
    """Checkpoints written before multi-process training kept one generator state under
    ``generator``; a work directory that holds one still resumes to the same result."""
    reference = Run()
    expected = reference.train(checkpoint=None)
    checkpoint = tmp_path / "run.pt"
    interrupted = Run()
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(checkpoint, interrupted_at(interrupted, call=8))
    content = torch.load(checkpoint, weights_only=True)
    content["generator"] = content.pop("generators")[0]
    torch.save(content, checkpoint)

    resumed = Run()
    assert resumed.train(checkpoint) == expected
    assert_same_weights(resumed.network, reference.network)


def test_warmup_clipping_ema_and_monitor_resume_exactly(tmp_path: Path) -> None:
    reference = StabilisedRun()
    expected = reference.train(None)
    # the monitor ran every 4 steps and after the last, and the held-out error fell
    assert [record["step"] for record in reference.monitor.history] == [4, 8, STEPS]
    assert reference.monitor.history[-1]["mse"] < reference.monitor.history[0]["mse"]
    checkpoint = tmp_path / "run.pt"
    interrupted = StabilisedRun()
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(checkpoint, interrupted_at(interrupted, call=8))
    resumed = StabilisedRun()
    assert resumed.train(checkpoint) == expected
    assert resumed.monitor.history == reference.monitor.history
    assert_same_weights(resumed.ema, reference.ema)
    assert_same_weights(resumed.network, reference.network)


def test_warmup_rises_linearly_then_holds_or_decays() -> None:
    network = torch.nn.Linear(2, 1)
    for decay, last in (("none", 1.0), ("cosine", 0.0)):
        optimiser = torch.optim.SGD(network.parameters(), lr=1.0)
        schedule = warmup_schedule(optimiser, 4, 12, decay=decay)
        rates = []
        for _ in range(12):
            rates.append(optimiser.param_groups[0]["lr"])
            optimiser.step()
            schedule.step()
        assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert rates[4] == pytest.approx(1.0) and rates[-1] == pytest.approx(last, abs=0.05)
    with pytest.raises(ValueError, match="decay"):
        warmup_schedule(torch.optim.SGD(network.parameters(), lr=1.0), 1, 2, decay="step")


def test_checkpoints_do_not_change_the_result(tmp_path: Path) -> None:
    reference, checkpointed = Run(), Run()
    assert reference.train(None) == checkpointed.train(tmp_path / "run.pt")
    assert_same_weights(checkpointed.network, reference.network)
    assert not list(tmp_path.iterdir())


def test_checkpoint_every_must_be_positive() -> None:
    run = Run()
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(run.network, run.optimiser, run.step_loss, STEPS, run.generator,
              checkpoint_every=0)


def test_fingerprint_names_settings_and_data() -> None:
    data = [np.zeros((4, 4), np.float32), np.ones(3, bool)]
    name = fingerprint({"steps": 10, "lr": 1e-3}, data)
    assert name == fingerprint({"lr": 1e-3, "steps": 10}, [a.copy() for a in data])
    assert name != fingerprint({"steps": 11, "lr": 1e-3}, data)
    changed = [data[0].copy(), data[1]]
    changed[0][2, 1] = 1e-6
    assert name != fingerprint({"steps": 10, "lr": 1e-3}, changed)
    assert checkpoint_path(None, name) is None
    assert checkpoint_path(Path("/work"), name) == Path("/work") / f"{name}.pt"


class AdversarialRun:
    """A generator and a discriminator with their own optimisers and an EMA of the
    generator: the shape of a GAN-trained harmonizer, at toy size."""

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.generator_net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4)
            )
            self.discriminator = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1)
            )
        self.ema = AveragedModel(self.generator_net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        self.g_optimiser = torch.optim.Adam(self.generator_net.parameters(), lr=1e-2)
        self.d_optimiser = torch.optim.Adam(self.discriminator.parameters(), lr=1e-2)
        self.state = TrainingState(
            {"generator": self.generator_net, "discriminator": self.discriminator,
             "ema": self.ema},
            {"generator": self.g_optimiser, "discriminator": self.d_optimiser},
        )
        self.rng = torch.Generator().manual_seed(1)
        self.calls = 0

    def step(self, generator: torch.Generator) -> float:
        """One discriminator update, one generator update, one EMA update."""
        self.calls += 1
        real = torch.randn(8, 4, generator=generator) + 2.0
        fake = self.generator_net(torch.randn(8, 4, generator=generator))
        logits = torch.nn.functional.binary_cross_entropy_with_logits
        d_loss = logits(self.discriminator(real), torch.ones(8, 1)) + logits(
            self.discriminator(fake.detach()), torch.zeros(8, 1)
        )
        self.d_optimiser.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimiser.step()
        g_loss = logits(self.discriminator(fake), torch.ones(8, 1))
        self.g_optimiser.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_optimiser.step()
        self.ema.update_parameters(self.generator_net)
        return float(g_loss.detach())

    def train(self, checkpoint: Path | None, stop_at_call: int | None = None) -> list[float]:
        def step(generator: torch.Generator) -> float:
            if self.calls + 1 == stop_at_call:
                raise KeyboardInterrupt
            return self.step(generator)

        return train_state(self.state, step, STEPS, self.rng, checkpoint=checkpoint,
                           checkpoint_every=CHECKPOINT_EVERY)


def test_two_networks_and_an_ema_resume_bit_identically(tmp_path: Path) -> None:
    reference = AdversarialRun()
    expected = reference.train(None)
    checkpoint = tmp_path / "gan.pt"
    with pytest.raises(KeyboardInterrupt):
        AdversarialRun().train(checkpoint, stop_at_call=8)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 6 and sorted(saved["modules"]) == ["discriminator", "ema", "generator"]

    resumed = AdversarialRun()
    assert resumed.train(checkpoint) == expected
    assert resumed.calls == STEPS - 6
    for name in ("generator_net", "discriminator", "ema"):
        assert_same_weights(getattr(resumed, name), getattr(reference, name))
    assert int(resumed.ema.n_averaged) == STEPS
    for mine, theirs in ((resumed.g_optimiser, reference.g_optimiser),
                         (resumed.d_optimiser, reference.d_optimiser)):
        for left, right in zip(mine.state.values(), theirs.state.values()):
            assert all(torch.equal(left[key], right[key]) for key in left)
    assert not checkpoint.exists()


def test_a_finished_stage_is_loaded_not_rerun(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"weights": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first = run_stage(tmp_path, "flow", "abc", compute)
    again = run_stage(tmp_path, "flow", "abc", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["weights"], first["weights"])
    assert stage_path(tmp_path, "flow", "abc").is_file()
    run_stage(tmp_path, "flow", "other-inputs", compute)
    run_stage(None, "flow", "abc", compute)  # no store: always computed
    assert len(calls) == 3
