"""The LightningModule for MIL: one aggregator, its loss and optimiser, validation metrics in the loop."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from wsimamba.errors import ConfigError, WsimambaError
from wsimamba.models.mil import MILOutput, create_model
from wsimamba.train.graphs import BagGraphs


class NonFiniteLossError(WsimambaError):
    """The training loss became NaN or infinite."""


class MILModule(L.LightningModule):
    """Holds the aggregator and the cross-entropy loss.

    Batches are dicts from :class:`wsimamba.data.BagDataset` collated to features (1, N, D), label (1,),
    or (``train.batch_size`` > 1, :func:`wsimamba.train.datamodule.collate_bags`) features a list of
    (N_b, D) bags, label (B,), run through the model's ``forward_bags`` (packed into one sequence where
    the model takes packed bags). The training loss is the mean over a batch's bags of each bag's
    cross-entropy, times its class weight when there are class weights (so B bags a step and
    ``accumulate`` B train the same). Logs ``train_loss``, ``val_loss``, ``val_auc`` (torchmetrics, synced across devices)
    and ``val_select`` (val AUC, ties broken by lower loss: on small validation sets many epochs
    reach the same AUC, and the checkpoint should not be the first, least trained of them).

    ``cuda_graphs`` ("auto" | True | False): replay each training bag's forward and backward from a CUDA
    graph of its length bucket (:class:`wsimamba.train.graphs.BagGraphs`). "auto" does where it can
    (:func:`graphs_unavailable`: one CUDA device, a model that takes padded bags, no gradient
    accumulation, one bag a step, not deterministic); True makes a ConfigError of what is missing.
    """

    def __init__(self, model_name: str, in_dim: int, n_classes: int, model_kwargs: dict | None = None,
                 lr: float = 2e-4, weight_decay: float = 1e-2, scheduler: str = "cosine", max_epochs: int = 50,
                 class_weights: list[float] | None = None, max_instances: int | None = None,
                 normalize: bool = True, cuda_graphs: bool | str = "auto", batch_size: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model_name, in_dim, n_classes, **(model_kwargs or {}))
        # Per-dimension feature standardisation with training-fold statistics (set_feature_stats).
        # Buffers, so a checkpoint carries them to prediction and heatmaps.
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        self.val_auc = BinaryAUROC() if n_classes == 2 else MulticlassAUROC(num_classes=n_classes, average="macro")

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std (in_dim,): the training bags' per-dimension statistics (std floored at 1e-6)."""
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float().clamp_min(1e-6))

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hparams.normalize:
            return x
        return (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> MILOutput:
        """x (B, N, in_dim) raw features → MILOutput(logits (B, n_classes), attention (B, N))."""
        return self.model(self._standardise(x))

    def forward_bags(self, bags: list[torch.Tensor]) -> MILOutput:
        """bags: raw (N_b, in_dim) features → the model's ``forward_bags`` of the standardised bags:
        MILOutput(logits (B, n_classes), attention (B, max N_b), 0 past each bag's end)."""
        return self.model.forward_bags([self._standardise(b) for b in bags])

    def _output(self, x) -> MILOutput:
        """A batch's features: one (1, N, D) bag, or a list of (N_b, D) bags (through forward_bags)."""
        return self.forward_bags(x) if isinstance(x, list) else self(x)

    def _train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over the bags of each bag's cross-entropy × its class weight."""
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="none")
        if self.loss_fn.weight is not None:
            loss = loss * self.loss_fn.weight[y]
        return loss.mean()

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        n, cap = x.shape[1], self.hparams.max_instances
        if cap is None or n <= cap:
            return x
        # sorted, so that sequence models still see patches in their stored order
        keep = torch.randperm(n, device=x.device)[:cap].sort().values
        return x[:, keep]

    def _bag_graphs(self) -> BagGraphs | None:
        """The training step's CUDA graphs, or None when they cannot run (`cuda_graphs`)."""
        mode = self.hparams.get("cuda_graphs", "auto")  # (checkpoints from before the option: auto)
        if mode is False:
            return None
        why = graphs_unavailable(self.device.type, self.trainer.world_size, self.model,
                                 self.trainer.accumulate_grad_batches, torch.are_deterministic_algorithms_enabled(),
                                 self.hparams.get("batch_size", 1))
        if why is None:
            return BagGraphs(self.model, self.feature_mean, self.feature_std, self.hparams.normalize)
        if mode is True:
            raise ConfigError(f"train.cuda_graphs=true, but {why}; set it to auto or false")
        return None

    def on_fit_start(self) -> None:
        self._graphs = self._bag_graphs()

    def teardown(self, stage: str) -> None:
        # the graphs hold their own activation memory; prediction and heatmaps run eagerly
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()
        self._graphs = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["features"], batch["label"]
        if isinstance(x, list):  # several bags, run packed
            logits = self.forward_bags([self._subsample(b[None])[0] for b in x]).logits
        else:
            x = self._subsample(x)
            graphs = getattr(self, "_graphs", None)
            logits = graphs.logits(x) if graphs is not None else None
            if logits is None:
                logits = self(x).logits
        loss = self._train_loss(logits, y)
        value = loss.detach().float()
        self._watch_loss(value)
        # summed on the device and logged once at the epoch's end: `self.log` every step cost ~1.9 ms of host
        # time a step (H200, lbmambamil at 10k patches: 12.7 against 10.8 ms per step without it)
        loss_sum = getattr(self, "_loss_sum", None)
        self._loss_sum = value if loss_sum is None else loss_sum + value
        self._loss_steps = getattr(self, "_loss_steps", 0) + 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_steps = None, 0

    # `if not torch.isfinite(loss)` every step would make the CPU wait for the GPU each step, so it could
    # not queue the next step's kernels while this one runs. Instead the first non-finite loss (its
    # value, epoch and step) is kept on the device and read back every CHECK_EVERY steps, before
    # validation and at the end of training epochs: at most CHECK_EVERY - 1 wasted steps, one sync.
    CHECK_EVERY = 32

    def on_train_start(self) -> None:
        self._bad: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._unchecked = 0

    def _watch_loss(self, loss: torch.Tensor) -> None:
        """Record `loss` (), detached fp32, if it is the first non-finite one, without a host-device sync."""
        if getattr(self, "_bad", None) is None:
            self._bad = (loss.new_full((), -1, dtype=torch.long), loss.new_full((), -1, dtype=torch.long),
                         loss.new_zeros(()))
            self._unchecked = 0
        epoch, step, value = self._bad
        first = ~torch.isfinite(loss) & (step < 0)
        # python-number operands are kernel arguments, not host-to-device copies
        self._bad = (torch.where(first, self.current_epoch, epoch), torch.where(first, self.global_step, step),
                     torch.where(first, loss, value))
        self._unchecked += 1
        if self._unchecked >= self.CHECK_EVERY:
            self._check_loss()

    def _check_loss(self) -> None:
        """Raise NonFiniteLossError naming the first non-finite training loss seen; one sync.

        Distributed, every rank raises (with the earliest bad step of any rank), so none is left
        waiting in a collective; the checks fall on the same steps on every rank."""
        self._unchecked = 0
        if getattr(self, "_bad", None) is None:
            return
        epoch, step, value = self._bad
        if self._trainer is not None and self.trainer.world_size > 1:
            rows = self.all_gather(torch.stack([epoch.double(), step.double(), value.double()])).reshape(-1, 3)
            seen = [r for r in rows.tolist() if r[1] >= 0]
        else:
            seen = [[epoch.item(), step.item(), value.item()]] if step.item() >= 0 else []
        if not seen:
            return
        epoch, step, value = min(seen, key=lambda r: r[1])
        self._bad = None
        raise NonFiniteLossError(
            f"the training loss became {value} at epoch {int(epoch)}, step {int(step)} "
            "(try a lower train.lr, train.grad_clip, or train.precision=32-true)"
        )

    def on_validation_start(self) -> None:
        self._check_loss()

    def on_train_epoch_end(self) -> None:
        self._check_loss()
        if getattr(self, "_loss_steps", 0):
            # the mean over the epoch's steps (of each step's mean over its bags), averaged over ranks
            self.log("train_loss", self._loss_sum / self._loss_steps, sync_dist=True)

    def on_train_end(self) -> None:
        self._check_loss()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=-1)
        return p[:, 1] if self.hparams.n_classes == 2 else p

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        y = batch["label"]
        logits = self._output(batch["features"]).logits.float()
        loss = F.cross_entropy(logits, y)  # the bags' plain mean: validation loss is not class-weighted
        self.val_auc.update(self._probs(logits), y)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        auc = self.val_auc.compute()
        self.val_auc.reset()
        loss = self.trainer.callback_metrics.get("val_loss")
        # auc is already the same on every rank (torchmetrics syncs its state); sync_dist keeps it so
        self.log("val_auc", auc, sync_dist=True)
        if loss is not None:
            self.log("val_select", auc - 1e-4 * loss.to(auc), sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self._output(batch["features"])
        return {"index": batch["index"], "probs": torch.softmax(out.logits.float(), -1), "attention": out.attention}

    def configure_optimizers(self):
        # fused on CUDA: one multi-tensor kernel instead of a few dozen launches a step (the host launching a
        # bag's step, not the GPU, bounds it at 10k patches)
        fused = all(p.is_cuda for p in self.parameters())
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                fused=fused or None)
        if self.hparams.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_epochs),
                                                           eta_min=self.hparams.lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def graphs_unavailable(device_type: str, world_size: int, model: nn.Module, accumulate: int,
                       deterministic: bool, batch_size: int = 1) -> str | None:
    """Why training steps cannot run from CUDA graphs here (a clause for an error message), or None."""
    if device_type != "cuda":
        return f"the model trains on {device_type}, not a CUDA device"
    if world_size > 1:
        return f"training runs on {world_size} devices (graphs run on one)"
    if not getattr(model, "takes_lengths", False):
        return f"model {type(model).__name__} does not take padded bags"
    if batch_size > 1:
        return "train.batch_size > 1 (packed batches of bags run eagerly)"
    if accumulate > 1:
        return "train.accumulate > 1 (the graphed backward's gradient buffers would be overwritten)"
    if deterministic:
        return "train.deterministic is on (the graphed, padded path is not checked under deterministic algorithms)"
    return None


@torch.no_grad()
def feature_stats(bags) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every instance of an iterable of (N_i, D) tensors (fp64 sums)."""
    total, sq, n = None, None, 0
    for x in bags:
        x = x.double()
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        n += x.shape[0]
    mean = total / n
    var = (sq / n - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float()


def balanced_class_weights(labels, n_classes: int) -> list[float]:
    """Weights n / (C · n_c), as scikit-learn's "balanced"; a class absent from `labels` gets 1."""
    counts = [int((labels == c).sum()) for c in range(n_classes)]
    n = sum(counts)
    return [n / (n_classes * c) if c else 1.0 for c in counts]
