"""What every sampler shares: the model signature, the per-step record, and seeded noise."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..diffusion import Model, Prediction, split_prediction


@dataclass
class StepRecord:
    """One reverse step, t → t_prev: its input x_t, the model's x̂_0, and the result x_prev.

    A pipeline's records also carry a ``previewer`` (``ldm.preview``): ``record.preview`` is then x̂_0 as an image in
    [−1, 1], computed the first time it is read, so a loop that never looks costs nothing."""

    index: int  # 0 … S−1
    t: int
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    x_prev: torch.Tensor
    previewer: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def preview(self) -> torch.Tensor:
        if self.previewer is None:
            raise ValueError("this record has no previewer: take records from a pipeline's loop, or set .previewer")
        return self.previewer(self.x0_pred)


SamplerLoop = Iterator[StepRecord]


Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (CPU by default) and moved to ``device``.

    Drawing on the CPU makes a seed give the same image on any accelerator. A list of generators, one per batch
    item, draws item k's slice (1, *shape[1:]) from generator k, as diffusers' ``randn_tensor`` does with a list:
    an image then gets the same noise in any batch, so image k of a batch seeded s, s+1, … is the image seed s+k
    gives alone — for x_T and for every noise a stochastic sampler draws on the way.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    g_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=g_device, dtype=torch.float32).to(device=device, dtype=dtype)


def predict(
    model: Model, prediction: Prediction, x_t: torch.Tensor, t: int, cond, alpha_bar_t: torch.Tensor, clip_x0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model at timestep t and return (x̂_0, ε̂).

    With ``clip_x0``, x̂_0 is clamped to the data range [−1, 1]  [Ho et al. 2020, §3.3]; ε̂ is kept as
    predicted (diffusers' default, so DDIM runs match its pipelines step for step).
    """
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out = model(x_t, t_batch, cond)
    if out.shape != x_t.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected {tuple(x_t.shape)}")
    x0, eps = split_prediction(prediction, out.to(x_t.dtype), x_t, alpha_bar_t)
    return (x0.clamp(-1, 1) if clip_x0 else x0), eps


def alpha_bars(schedule, timesteps: torch.Tensor, final_alpha_bar: float | None = None):
    """ᾱ at each visited timestep and at the step after it (1 after the last one, unless given).

    ``final_alpha_bar`` is diffusers' ``set_alpha_to_one=False`` (ᾱ_0 instead of 1 after the last step).
    """
    ab = schedule.alpha_bar_f64[timesteps]
    last = torch.tensor([1.0 if final_alpha_bar is None else final_alpha_bar], dtype=torch.float64)
    return ab, torch.cat([ab[1:], last])


def run_to_end(records: SamplerLoop, total: int | None = None, progress: bool = True, desc: str = "sample",
               each: Callable[[StepRecord], None] | None = None) -> StepRecord:
    """Run a sampler's generator to its last step, with a progress bar of ``total`` steps, handing every record to
    ``each`` (e.g. to keep a trajectory); the last record."""
    record = None
    for record in tqdm(records, total=total, disable=not progress, desc=desc):
        if each is not None:
            each(record)
    if record is None:
        raise ValueError("the sampler ran no step")
    return record
