"""Self-distillation (SD) objectives for EPSD (docs/methods.md §3): CS-KD, PS-KD and DLB.

Each class is a :class:`~kdprune_cli.training.objective.Objective`: it is called as
``objective(model, x, y, idx) -> (loss, logits)`` where ``x`` is the trainer's (augmented, normalised)
batch, ``y`` its labels, ``idx`` the samples' indices in ``data.train``, and ``logits`` are the model's
logits on ``x``. ``model`` is only ever called as ``model(inputs)``, so the same objective also serves
the functional forward of the EPSD saliency (:mod:`kdprune_cli.pruning.methods.epsd`).

No pretrained teacher is used: the network is its own teacher. ``teacher_samples`` counts the CS-KD partner
batches (forward only, under ``no_grad``), ``extra_samples`` DLB's previous batches (forward and backward).

Where an SD loss draws other samples (CS-KD partners, DLB's previous batch), they are read from
``data.train`` (uint8 on the device), augmented with the objective's own seeded generator when
``augment`` is true (our choice: it follows the training recipe's ``augment``), and normalised.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdprune_cli.distill import losses
from kdprune_cli.training.objective import Objective

SD_NAMES = ("cs_kd", "ps_kd", "dlb")


class _FromData(Objective):
    """Shared helper: fetch training samples by index, augment (seeded) and normalise them on device."""

    def __init__(self, data, augment: bool, gen: Optional[torch.Generator]):
        self.data, self.augment = data, bool(augment)
        # on the data's device, so drawing partners/crops never copies from the host per batch
        self.gen = data.device_generator(gen if gen is not None else torch.Generator().manual_seed(0))
        self.teacher_samples = self.extra_samples = 0

    # resume (the loop's checkpoints): the random stream; the loop books the counters itself
    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"].cpu())

    def fetch(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        x = self.data.train.x[idx.to(self.data.train.x.device)]
        if self.augment:
            x = self.data.augment(x, self.gen)
        return self.data.normalise(x).to(device=like.device, dtype=like.dtype)


class CSKD(_FromData):
    """CS-KD, class-wise self-knowledge distillation (Yun et al., CVPR 2020, arXiv 2003.13964, Eq. 3–4).

    For every sample ``x`` (label ``y``) another training sample ``x′`` of the same class is drawn
    uniformly among the *other* samples of that class (the sample itself only when it is alone in its
    class); ``x′`` is augmented and normalised on the device with this objective's seeded generator and
    pushed through the same network under ``no_grad`` (train mode, as in the authors' code):

        L = CE(z(x), y) + λ·T²·KL(softmax(z(x′)/T).detach() ‖ softmax(z(x)/T)),   T = 4, λ = 1.

    CE is on ``x`` only; the partner only supplies the (detached) soft target.
    """

    teacher_rate, self_teacher = 1, True  # a same-class partner per sample through the network, under no_grad

    def __init__(self, data, *, temperature: float = 4.0, lam: float = 1.0, augment: bool = True,
                 gen: Optional[torch.Generator] = None):
        super().__init__(data, augment, gen)
        self.temperature, self.lam = float(temperature), float(lam)
        y = data.train.y  # index tables live on the data's device: partner draws never sync with the host
        n_cls = int(data.num_classes)
        self._order = torch.sort(y, stable=True).indices                  # sample ids grouped by class
        self._pos = torch.empty_like(self._order)
        self._pos[self._order] = torch.arange(len(y), device=y.device)     # position of each id in _order
        self._count = counts = torch.bincount(y, minlength=n_cls)
        self._start = torch.cumsum(counts, 0) - counts

    def partners(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Indices of same-class partners, uniform over the other members of each sample's class."""
        idx, y = idx.to(self._order.device), y.to(self._order.device)
        count, start = self._count[y], self._start[y]
        others = (count - 1).clamp_min(1)
        u = torch.rand(len(idx), generator=self.gen, dtype=torch.float64, device=self.gen.device)
        r = torch.floor(u.to(others.device) * others).long()
        r = torch.minimum(r, others - 1)
        pos = start + r
        alone = count <= 1
        pos = torch.where((pos >= self._pos[idx]) & ~alone, pos + 1, pos)   # skip the sample itself
        pos = torch.where(alone, self._pos[idx], pos)
        return self._order[pos]

    def __call__(self, model, x, y, idx):
        pidx = self.partners(idx, y)
        xp = self.fetch(pidx, x)
        with torch.no_grad():
            zp = model(xp).detach()
        self.teacher_samples += xp.shape[0]
        logits = model(x)
        loss = F.cross_entropy(losses.upcast(logits), y) + self.lam * losses.kd_loss(logits, zp, self.temperature)
        return loss, logits


class PSKD(Objective):
    """PS-KD, progressive self-knowledge distillation (Kim et al., ICCV 2021, arXiv 2006.12000, Eq. 6–7).

    Targets ``(1 − α_t)·onehot(y) + α_t·p_prev(x)``, where ``p_prev`` is the model's own softmax (T = 1)
    for that sample recorded during the previous epoch's training step (stored per sample by ``idx``,
    on the augmented view the trainer gave, train mode — as in the authors' code). ``α_t = α_T·t/T`` with
    ``t`` the 1-based epoch and ``T`` the number of epochs (so the last epoch uses ``α_T`` = 0.8). The
    first epoch is plain CE (no previous predictions exist); a sample that the trainer dropped in the
    previous epoch (``drop_last``) keeps its last stored prediction, or its one-hot label if it was never
    seen. Loss: soft-target cross-entropy ``−Σ_c target_c·log softmax(z)_c``, batch mean.
    """

    def __init__(self, data, *, epochs: int, alpha_T: float = 0.8):
        self.alpha_T, self.epochs = float(alpha_T), max(int(epochs), 1)
        self.prev = F.one_hot(data.train.y, int(data.num_classes)).float()  # per-sample predictions of the last epoch
        self.epoch = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"prev": self.prev, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.prev, self.epoch = state["prev"].to(self.prev.device), int(state["epoch"])

    def targets(self, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.prev.shape[1]).to(self.prev.dtype)
        if self.epoch == 0:
            return onehot
        a = self.alpha_T * (self.epoch + 1) / self.epochs  # α_t, t the 1-based epoch
        return (1.0 - a) * onehot + a * self.prev[idx.to(self.prev.device)].to(onehot.device)

    def __call__(self, model, x, y, idx):
        logits = model(x)
        z = losses.upcast(logits)
        t = self.targets(y, idx).to(z.dtype)
        loss = -(t * F.log_softmax(z, dim=-1)).sum(dim=-1).mean()
        with torch.no_grad():
            self.prev[idx.to(self.prev.device)] = F.softmax(z.detach(), dim=-1).to(self.prev)
        return loss, logits


class DLB(_FromData):
    """DLB, self-distillation from the last mini-batch (Shen et al., CVPR 2022, arXiv 2203.16172, Eq. 4–5).

    Iteration ``t`` trains on its own batch ``B_t`` *and* on the samples of the last mini-batch
    ``B_{t−1}``: those are fetched again by index from ``data.train`` as a fresh augmented view (the
    authors load two augmented views of every image and use the second one here) and pushed forward and
    backward with the current weights. Their logits from iteration ``t−1`` (detached) are the soft targets:

        L = CE([z_t(B_{t−1}); z_t(B_t)], [y_{t−1}; y_t]) + α·T²·KL(p_{t−1}(B_{t−1}) ‖ p_t(B_{t−1})),

    T = 3, α = 1; CE is the mean over both parts, KL the mean over the overlapping samples. The two parts
    are forwarded separately (separate BN batch statistics, as in the authors' code). The first call has
    no last batch and is plain CE; the state carries over epoch boundaries (as in the authors' code).
    """

    extra_rate, extra_skip = 1, 1  # the last batch again, forward and backward, from the second step on

    def __init__(self, data, *, temperature: float = 3.0, alpha: float = 1.0, augment: bool = True,
                 gen: Optional[torch.Generator] = None):
        super().__init__(data, augment, gen)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.last: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (idx, y, logits)

    def state_dict(self) -> dict:
        last = {} if self.last is None else dict(zip(("idx", "y", "logits"), self.last))
        return {**super().state_dict(), "last": last}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        last = state["last"]
        self.last = (last["idx"], last["y"], last["logits"]) if last else None

    def __call__(self, model, x, y, idx):
        logits = model(x)
        if self.last is None:
            loss = F.cross_entropy(losses.upcast(logits), y)
        else:
            pidx, py, plogits = self.last
            xp = self.fetch(pidx, x)
            zp = model(xp)
            self.extra_samples += xp.shape[0]
            ce = F.cross_entropy(torch.cat([losses.upcast(zp), losses.upcast(logits)]),
                                 torch.cat([py.to(y.device), y]))
            loss = ce + self.alpha * losses.kd_loss(zp, plogits, self.temperature)
        self.last = (idx.detach(), y.detach(), logits.detach())
        return loss, logits


def make_sd(name: str, data, cfg, *, epochs: int, augment: bool, gen: torch.Generator):
    """Build the SD objective ``name`` from a method node ``cfg`` with sub-nodes ``cs_kd``/``ps_kd``/``dlb``."""
    if name == "cs_kd":
        return CSKD(data, temperature=cfg.cs_kd.temperature, lam=cfg.cs_kd.lam, augment=augment, gen=gen)
    if name == "ps_kd":
        return PSKD(data, epochs=epochs, alpha_T=cfg.ps_kd.alpha_T)
    if name == "dlb":
        return DLB(data, temperature=cfg.dlb.temperature, alpha=cfg.dlb.alpha, augment=augment, gen=gen)
    raise ValueError(f"unknown self-distillation loss {name!r}; choose one of {', '.join(SD_NAMES)}")
