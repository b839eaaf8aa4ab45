"""CoBa, the Convergence Balancer (`weighted_loss_mode: coba`): task weights that follow how fast each
task's validation loss falls.

CoBa ("CoBa: Convergence Balancer for Multitask Finetuning of Large Language Models", EMNLP 2024,
arXiv 2410.06741) gives more weight to tasks whose validation loss still falls slowly, and less to
tasks that have converged or started to overfit. With K tasks, h_i(s) the validation loss of task i
at sample s divided by its value before training, and a_i the least-squares slope of h_i over the
last `history_length` samples:

- relative convergence score  RCS = softmax_i(K * a_i / sum_j |a_j|)
- absolute convergence score  ACS = softmax_i(-N * a_i / sum over the window of task i's slopes |a_i|)
- divergence factor           DF  = M * softmax(-tau * M * a_max / sum |a_max|)[last], over the M slopes
                                    a_max of max_i h_i recorded so far
- weights = softmax_i(K * (DF * RCS + (1 - DF) * ACS)), then, if any weight is below 1/(10K),
  w <- 0.9 * w + 1/(10K)

MFTCoder's `CoBaStatus` (mftcoder_accelerate/src/utils/loss_utils.py) is the numerical reference:
given the same history of validation losses, the weights here equal its weights (tests/test_coba.py).
The pieces of math are pure functions of tensors; `CoBaBalancer` holds the histories and applies the
schedule (warmup, update interval, windows), and `ValidationStream` says which validation rows each
draw uses (mft_trainer/coba_validation.py), so that a resumed run draws the same batches as an
uninterrupted one.

>>> import math
>>> balancer = CoBaBalancer(num_tasks=3, warmup_steps=100)
>>> balancer.set_initial_losses([1.0, 1.0, 1.0])        # L_i(0): the validation losses before training
>>> for step in range(1, 151):                          # after each optimizer step (should_sample(step))
...     losses = [math.exp(-step / 30), 1 - step / 1000, math.exp(-step / 100)]   # measured per task
...     balancer.record(step, losses)
>>> balancer.weights.round(decimals=3)                  # the case3 weights of the next steps
tensor([0.1930, 0.6200, 0.1870], dtype=torch.float64)
>>> state = balancer.state_dict()                       # plain JSON-serialisable values
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

STATE_VERSION = 1


# ---- The math: pure functions of float64 tensors ------------------------------------------------


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (no signal: fewer than two points, or all
    slopes 0), never NaN."""
    return numerator / torch.where(denominator != 0, denominator, torch.ones_like(denominator))


def fit_slope(values: Tensor) -> Tensor:
    """Least-squares slope of series against their positions 0, 1, ..., skipping missing points.

    Args:
        values: ``[..., N]`` float, NaN where a point is missing (the task had no token in that draw).
    Returns:
        ``[...]`` float64: the slope per position of each series, 0 when it has fewer than two points.
    """
    values = values.double()
    present = ~torch.isnan(values)  # [..., N]
    # Missing points keep their true positions (MFTCoder closes the gaps instead; with no gap the two agree).
    x = torch.arange(values.shape[-1], dtype=torch.float64).expand_as(values)  # [..., N]
    count = present.sum(dim=-1, keepdim=True).clamp(min=1)  # [..., 1]
    x_mean = torch.where(present, x, 0).sum(dim=-1, keepdim=True) / count
    y_mean = torch.where(present, values, 0).sum(dim=-1, keepdim=True) / count
    dx = torch.where(present, x - x_mean, 0)  # [..., N]
    dy = torch.where(present, values - y_mean, 0)  # [..., N]
    return _ratio((dx * dy).sum(dim=-1), (dx * dx).sum(dim=-1))  # one point: dx = 0, slope 0


def window_slopes(history: Tensor) -> tuple[Tensor, Tensor]:
    """Slopes of each task's normalised validation loss, and of their maximum, over a window.

    Args:
        history: ``[K, N]`` float, h_i at N consecutive samples, NaN where missing.
    Returns:
        ``(a [K], a_max scalar)``: the slope of each row, and of max_i h_i (over the tasks present at
        each sample).
    """
    history = history.double()
    # nan-aware max over tasks: a sample where no task is present stays NaN and is skipped.
    highest = torch.where(torch.isnan(history), -math.inf, history).amax(dim=0)  # [N]
    highest = torch.where(torch.isinf(highest), math.nan, highest)
    slopes = fit_slope(torch.cat([history, highest[None]]))  # [K + 1]
    return slopes[:-1], slopes[-1]


def relative_convergence_score(slopes: Tensor) -> Tensor:
    """RCS = softmax(K * a / sum |a|): among the tasks, the slowest to fall (largest slope) scores highest.

    Args:
        slopes: ``[K]`` current slopes.
    Returns:
        ``[K]`` float64, sums to 1.
    """
    slopes = slopes.double()
    return torch.softmax(_ratio(slopes.numel() * slopes, slopes.abs().sum()), dim=-1)


def absolute_convergence_score(slope_history: Tensor) -> Tensor:
    """ACS = softmax(-N * a / sum over the window of |a|), per task against its own recent slopes: a task
    that falls fast compared with how it fell before scores high, one that turns upward scores low.

    Args:
        slope_history: ``[K, N]`` each task's slopes over the window, the current ones last.
    Returns:
        ``[K]`` float64, sums to 1.
    """
    slope_history = slope_history.double()
    n = slope_history.shape[1]
    scaled = _ratio(-n * slope_history[:, -1], slope_history.abs().sum(dim=1))  # [K]
    return torch.softmax(scaled, dim=-1)


def divergence_factor(max_slope_history: Tensor, tau: float) -> Tensor:
    """DF = M * softmax(-tau * M * a_max / sum |a_max|) at the latest of the M slopes of max_i h_i.

    About 1 while the worst task's loss falls as it did before (trust RCS); towards 0 when it rises
    (trust ACS, which penalises the diverging task).

    Args:
        max_slope_history: ``[M]`` slopes of the per-sample maximum over tasks, oldest first.
        tau: temperature (`coba_tau`); larger makes DF react faster.
    Returns:
        Scalar float64 in ``[0, M]``.
    """
    max_slope_history = max_slope_history.double()
    m = max_slope_history.numel()
    scaled = _ratio(-m * max_slope_history, max_slope_history.abs().sum())  # [M]
    return m * torch.softmax(tau * scaled, dim=-1)[-1]


def floor_weights(weights: Tensor) -> Tensor:
    """If any of the K weights is below 1/(10K), map every weight w to 0.9 * w + 1/(10K).

    The sum stays 1 and the smallest weight becomes at least 1/(10K), so no task is ever dropped.
    """
    k = weights.numel()
    minimum = 1.0 / (10 * k)
    if bool((weights < minimum).any()):
        return weights * (1 - minimum * k) + minimum
    return weights


def coba_weights(slope_history: Tensor, max_slope_history: Tensor, tau: float) -> Tensor:
    """The CoBa task weights from the slope histories.

    Args:
        slope_history: ``[K, N]`` the tasks' slopes in the ACS window, the current ones last.
        max_slope_history: ``[M]`` every slope of max_i h_i since warmup, the current one last.
        tau: `coba_tau`.
    Returns:
        ``[K]`` float64 weights, summing to 1, each at least 1/(10K).
    """
    k = slope_history.shape[0]
    rcs = relative_convergence_score(slope_history[:, -1])
    acs = absolute_convergence_score(slope_history)
    df = divergence_factor(max_slope_history, tau)
    return floor_weights(torch.softmax(k * (df * rcs + (1 - df) * acs), dim=-1))


# ---- The state and the schedule ------------------------------------------------------------------


def _to_json_list(values: Tensor | Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in torch.as_tensor(values, dtype=torch.float64).tolist()]


def _from_json_list(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


class CoBaBalancer:
    """The state of CoBa: validation-loss history, slope histories and the current task weights.

    Driven by the trainer: :meth:`set_initial_losses` once before training, then after every
    optimizer step for which :meth:`should_sample` is true, :meth:`record` with the per-task mean
    validation losses; :attr:`weights` are the weights of the following steps.

    Schedule (MFTCoder's): a sample every `update_interval` steps; until `warmup_steps` the weights
    are `initial_weights`; from then on, every `update_interval` steps, the slopes over the last
    `history_length` samples are fitted and appended to the slope histories, and the weights are
    recomputed. The ACS window holds the slope entries of index >= u - `history_length`, where u is
    the number of update intervals so far (MFTCoder's window: all entries until step
    `history_length`, then the last `history_length - warmup_steps / update_interval + 1`; at least
    one). DF uses every max-slope entry since warmup. Samples that no weight update will ever use
    (older than `history_length` samples before warmup) are not taken.

    Args:
        num_tasks: K.
        initial_weights: ``[K]`` weights before warmup (default equal); normalised to sum 1.
        warmup_steps, history_length, tau, update_interval: `coba_warmup_steps`, `coba_history_length`,
            `coba_tau`, `coba_update_interval` of `MFTConfig`.
    """

    def __init__(
        self,
        num_tasks: int,
        initial_weights: Sequence[float] | Tensor | None = None,
        warmup_steps: int = 100,
        history_length: int = 200,
        tau: float = 5.0,
        update_interval: int = 1,
    ):
        # MFTConfig checks these as settings; this checks them for a balancer built by hand.
        given = {"num_tasks": num_tasks, "warmup_steps": warmup_steps, "history_length": history_length,
                 "tau": tau, "update_interval": update_interval}
        in_range = {
            "num_tasks": num_tasks >= 1,
            "warmup_steps": warmup_steps >= 0,
            "history_length": history_length >= 2,  # a slope needs two points
            "tau": math.isfinite(tau) and tau > 0,
            "update_interval": update_interval >= 1,
        }
        wrong = [f"{name}={given[name]!r}" for name, ok in in_range.items() if not ok]
        if wrong:
            raise ValueError(f"CoBaBalancer: out of range: {', '.join(wrong)}")
        self.num_tasks = num_tasks
        self.warmup_steps = warmup_steps
        self.history_length = history_length
        self.tau = float(tau)
        self.update_interval = update_interval
        weights = torch.ones(num_tasks) if initial_weights is None else torch.as_tensor(initial_weights)
        weights = weights.double()
        valid = weights.shape == (num_tasks,) and bool(torch.isfinite(weights).all() and (weights >= 0).all())
        if not valid or weights.sum() <= 0:
            raise ValueError(
                f"initial_weights must be {num_tasks} finite numbers >= 0, not all 0, got {weights.tolist()}"
            )
        self.initial_weights = weights / weights.sum()
        self.reset()

    def reset(self) -> None:
        """Forget everything: back to the state before training."""
        self.initial_losses: Tensor | None = None  # [K] L_i(0)
        self.num_samples = 0  # samples recorded so far (each is `sample_valid_num` draws)
        self.last_losses: Tensor | None = None  # [K] raw mean validation losses of the latest sample
        k = self.num_tasks
        self._history = torch.zeros(k, 0, dtype=torch.float64)  # [K, <= history_length] h, NaN where missing
        self._slopes = torch.zeros(k, 0, dtype=torch.float64)  # [K, N] task slopes in the ACS window, oldest first
        self._slopes_start = 0  # index (in updates since warmup) of the first column of self._slopes
        self._max_slopes = torch.zeros(0, dtype=torch.float64)  # [M] every max-slope since warmup
        self._weights = self.initial_weights.clone()

    # -- driving ---------------------------------------------------------------------------------

    @property
    def weights(self) -> Tensor:
        """``[K]`` float64 weights (summing to 1) for the next optimizer steps."""
        return self._weights.clone()

    @property
    def num_updates(self) -> int:
        """How many times the weights have been recomputed (after warmup)."""
        return self._max_slopes.numel()

    def should_sample(self, step: int) -> bool:
        """Whether to measure the validation losses after optimizer step `step` (1-based)."""
        if step < 1 or step % self.update_interval:
            return False
        # The first update (at `warmup_steps`) looks back `history_length` samples; older ones are unused.
        return step + self.history_length * self.update_interval > self.warmup_steps

    def set_initial_losses(self, losses: Tensor | Sequence[float]) -> None:
        """Set L_i(0), the per-task validation losses before training.

        Raises:
            ValueError: a loss that is missing (NaN), not finite or not > 0: h_i = L_i / L_i(0) needs it.
        """
        losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
        if losses.numel() != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} initial losses, got {losses.numel()}")
        bad = [i for i, v in enumerate(losses.tolist()) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(
                f"initial validation losses must be finite and > 0 for every task; task ids {bad} have "
                f"{[losses[i].item() for i in bad]} (NaN: no validation token of that task)"
            )
        self.initial_losses = losses

    def record(self, step: int, losses: Tensor | Sequence[float]) -> None:
        """Record the per-task mean validation losses measured after optimizer step `step`, and update
        the weights when the step is an update step past warmup.

        Args:
            step: the optimizer steps done (1-based), as `TrainerState.global_step`.
            losses: ``[K]`` mean validation loss of each task, NaN for a task absent from the draw.
        """
        if self.initial_losses is None:
            raise RuntimeError("CoBaBalancer.record before set_initial_losses: measure L_i(0) before training")
        losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
        if losses.numel() != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {losses.numel()}")
        self.last_losses = losses
        h = losses / self.initial_losses  # [K]
        self._history = torch.cat([self._history, h[:, None]], dim=1)[:, -self.history_length :]
        self.num_samples += 1
        if step >= self.warmup_steps and step % self.update_interval == 0:
            self._update(step)

    def _update(self, step: int) -> None:
        slopes, max_slope = window_slopes(self._history)  # [K], scalar
        self._slopes = torch.cat([self._slopes, slopes[:, None]], dim=1)
        self._max_slopes = torch.cat([self._max_slopes, max_slope[None]])
        # MFTCoder's ACS window (see the class docstring); it only moves forward, so older entries go.
        latest = self.num_updates - 1
        start = min(max(0, step // self.update_interval - self.history_length), latest)
        if start > self._slopes_start:
            self._slopes = self._slopes[:, start - self._slopes_start :]
            self._slopes_start = start
        self._weights = coba_weights(self._slopes, self._max_slopes, self.tau)

    # -- checkpointing ---------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "history_length": self.history_length,
            "tau": self.tau,
            "update_interval": self.update_interval,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as plain JSON-serialisable values (missing = None)."""
        return {
            "version": STATE_VERSION,
            "num_tasks": self.num_tasks,
            "settings": self.settings(),
            "initial_weights": _to_json_list(self.initial_weights),
            "initial_losses": None if self.initial_losses is None else _to_json_list(self.initial_losses),
            "num_samples": self.num_samples,
            "last_losses": None if self.last_losses is None else _to_json_list(self.last_losses),
            "history": [_to_json_list(h) for h in self._history.T],  # oldest sample first
            "slopes": [_to_json_list(s) for s in self._slopes.T],
            "slopes_start": self._slopes_start,
            "max_slopes": _to_json_list(self._max_slopes),
            "weights": _to_json_list(self._weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The settings are this object's (a resumed run may change them).

        Raises:
            ValueError: a state of another version or another number of tasks.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CoBa state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        if state["num_tasks"] != self.num_tasks:
            raise ValueError(
                f"the CoBa state has {state['num_tasks']} tasks but this run has {self.num_tasks}: resume with the "
                "same tasks as the checkpoint"
            )
        self.reset()
        if state["initial_losses"] is not None:
            self.initial_losses = torch.tensor(_from_json_list(state["initial_losses"]), dtype=torch.float64)
        self.num_samples = int(state["num_samples"])
        if state["last_losses"] is not None:
            self.last_losses = torch.tensor(_from_json_list(state["last_losses"]), dtype=torch.float64)
        k = self.num_tasks

        def matrix(rows: list) -> Tensor:  # [K, len(rows)]
            return torch.tensor([_from_json_list(r) for r in rows], dtype=torch.float64).reshape(-1, k).T

        self._history = matrix(state["history"])[:, -self.history_length :]
        self._slopes = matrix(state["slopes"])
        self._slopes_start = int(state["slopes_start"])
        self._max_slopes = torch.tensor(_from_json_list(state["max_slopes"]), dtype=torch.float64)
        self._weights = torch.tensor(_from_json_list(state["weights"]), dtype=torch.float64)
