"""The DiT teacher's objective: DDPM epsilon prediction, optionally with DiT's learned variance.

(`dit.objective: flow_matching` trains the teacher with `reflow.rectified.RectifiedFlow` on the independent
coupling instead; `stages/dit.py`, `teacher_objective`, picks one.)

Noise schedule and `add_noise` come from diffusers' `DDPMScheduler` (1000-step linear betas), so the
teacher trained here and the DDIM sampler that reads it share one definition of alpha-bar.
Classifier-free guidance needs the model to see the null class: labels are replaced by `null_label`
with probability `label_dropout`, once per sample (diffusers' own per-block dropout is switched off).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from torch import nn


def make_ddpm_scheduler(num_train_timesteps: int, beta_start: float, beta_end: float) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
        beta_schedule="linear", prediction_type="epsilon", clip_sample=False,
    )


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2
                  * torch.exp(-logvar2))


class DDPMObjective:
    """`loss(model, batch, generator)` for `reflow.train.train`; batch holds `z1` latents and `label`."""

    def __init__(
        self, scheduler: DDPMScheduler, *, null_label: int, label_dropout: float, learn_sigma: bool
    ):
        self.scheduler = scheduler
        self.null_label = null_label
        self.label_dropout = label_dropout
        self.learn_sigma = learn_sigma
        betas = scheduler.betas.double()
        abar = scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        # Clipped at t = 0 as in DDPM/DiT: the posterior variance is 0 there.
        self._consts = {
            "abar": abar,
            "log_beta": betas.log(),
            "post_log_var": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "post_c0": betas * abar_prev.sqrt() / (1 - abar),
            "post_ct": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }

    def _c(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = self._consts[name].to(like.device)[t].to(like.dtype)
        return v.view(-1, *([1] * (like.ndim - 1)))

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int):
        x0, y = batch["z1"], batch["label"]
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        y = drop_labels(y, self.label_dropout, self.null_label, generator)
        out = model(x_t, timestep=t.float(), class_labels=y).sample
        c = x0.shape[1]
        eps = out[:, :c]
        loss = (eps.float() - noise.float()).pow(2).mean()
        if self.learn_sigma:
            loss = loss + self._vb(out[:, c:].float(), eps.detach().float(), x0.float(), x_t.float(), t)
        return loss

    def _vb(self, v, eps, x0, x_t, t) -> torch.Tensor:
        """DiT's learned-range variance term: KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) in nats/dim.

        The mean is built from the stop-gradient epsilon so that only the variance channels learn
        from this term. The t = 0 decoder likelihood is replaced by the same KL (a small bias on one
        of 1000 timesteps, in exchange for not discretising latents that are not pixels).
        """
        abar = self._c("abar", t, x0)
        x0_pred = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        mean_true = self._c("post_c0", t, x0) * x0 + self._c("post_ct", t, x0) * x_t
        mean_pred = self._c("post_c0", t, x0) * x0_pred + self._c("post_ct", t, x0) * x_t
        frac = (v + 1) / 2
        log_var = frac * self._c("log_beta", t, x0) + (1 - frac) * self._c("post_log_var", t, x0)
        kl = _normal_kl(mean_true, self._c("post_log_var", t, x0), mean_pred, log_var)
        # DiT scales the term by T / 1000 so its weight does not depend on the number of steps.
        return kl.mean() / math.log(2.0) * (self.scheduler.config.num_train_timesteps / 1000.0)
