"""The config sections that say how the stages run: ``schedule`` (training), ``prune``, ``finetune``, ``compress``
(with ``compress.target``) and ``deploy``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .config_sections import Section

__all__ = ["ScheduleConfig", "PruneConfig", "FinetuneConfig", "TargetConfig", "CompressConfig", "DeployConfig"]


class ScheduleConfig(Section):
    """``schedule``: how long and how to train."""

    epochs: int = Field(5, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="training batch size")
    eval_batch_size: int = Field(1024, ge=1, description="batch size for evaluation and BatchNorm recalibration")
    seed: int = Field(0, ge=0, description="seed of model initialisation, batch order and recalibration batches")
    bn_recalibration_batches: int = Field(20, ge=0, description="training batches used to recompute BatchNorm "
                                                          "statistics before every evaluation (0 = off)")
    device: str = Field("auto", description="where training runs: auto (cuda when torch.cuda.is_available(), "
                                            "else cpu), cpu, cuda or cuda:N; compress, export and bench always "
                                            "run on the CPU")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forward under autocast on the run's "
                                                                   "device, parameters and solver state in fp32")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads for training and evaluation; null = "
                                                  "torch's default (one per core)")

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        from .device import check_spec  # the format only: whether CUDA is there is checked when training starts
        if not isinstance(value, str):
            raise ValueError(f"device must be a string: auto, cpu, cuda or cuda:N; got {value!r}")
        return check_spec(value)


class PruneConfig(Section):
    """``prune``: removing the exact zeros."""

    round_to: int | None = Field(None, ge=1, description="keep zero channels so every pruned width is a multiple of "
                                                   "this (8 or 16 suit ONNX Runtime's convolutions); null = off")
    verify_tol: float = Field(1e-5, ge=0, description="largest allowed relative difference between slim and trained "
                                                "outputs: max |slim - trained| / (max |trained output| + 1e-12), in "
                                                "the model's dtype (float32 rounding gives about 1e-7 to 1e-6)")
    verify_examples: int = Field(256, ge=1, description="validation examples used to verify the slim model")


class FinetuneConfig(Section):
    """``finetune``: train the slim model after pruning (0 epochs = off). The epochs count in the run's budget."""

    epochs: int = Field(0, ge=0, description="fine-tuning epochs of the slim model after pruning; 0 = none")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="AdamW learning rate, decayed to 0 by a cosine schedule")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine: decay lr to 0; constant")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay")
    distill: bool = Field(False, description="knowledge distillation from the trained dense model: the loss mixes "
                                             "cross entropy with T^2 KL(teacher || student) on logits at temperature T")
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (1 - alpha: cross entropy)")


class TargetConfig(Section):
    """``compress.target``: exactly one cost, as a ratio of the dense model's (e.g. ``macs: 0.5``)."""

    macs: float | None = Field(None, gt=0, lt=1, description="multiply-accumulates of the slim model / dense")
    params: float | None = Field(None, gt=0, lt=1, description="parameters of the slim model / dense")
    latency: float | None = Field(None, gt=0, lt=1, description="ONNX Runtime median latency of the slim model / "
                                                                "dense, at batch size `batch`, deploy.threads threads")
    batch: int = Field(64, ge=1, description="batch size of a latency target")

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        given = [k for k in ("macs", "params", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, params, latency (a ratio of the dense model in (0, 1), e.g. "
                             f"macs: 0.5); got {', '.join(given) or 'none'}")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in ("macs", "params", "latency") if getattr(self, k) is not None)

    @property
    def ratio(self) -> float:
        return getattr(self, self.metric)


class CompressConfig(Section):
    """``compress``: aim at a cost target instead of a hand-tuned lam (structkit/target.py has the method)."""

    target: TargetConfig | None = Field(None, description="null: remove the exact zeros the training found")
    tolerance: float = Field(0.05, gt=0, lt=1, description="how far below the target the reached ratio may be")
    checks_per_epoch: int = Field(8, ge=1, description="how often per epoch the lam controller measures the "
                                                       "identified structure and adapts lam")
    final_stage: Literal["regularized", "fixed"] = Field(
        "regularized", description="fixed: at the start of the final stage the groups the target needs are set to "
        "zero and kept there, and the rest trains with lam 0 (structkit/fixed_stage.py)")
    cost_exponent: float = Field(0.5, ge=0, le=2, description="cost-aware lam: each block's lam is scaled by (cost "
                                 "its groups carry per entry) ** cost_exponent, normalised; 0 = plain group lasso")


class DeployConfig(Section):
    """``deploy``: ONNX export and the ONNX Runtime latency protocol."""

    opset: int = Field(18, ge=7, le=25, description="ONNX opset version (18 is a safe choice)")
    exporter: Literal["torchscript", "dynamo"] = Field("torchscript", description="torch.onnx exporter")
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 64], min_length=1,
                                                           description="batch sizes to time")
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads (the same for both models)")
    warmup: int = Field(20, ge=0, description="untimed warm-up runs per model and batch size")
    runs: int = Field(100, ge=1, description="timed runs per model and batch size (dense and slim interleaved)")
    graph_optimization: Literal["fastest", "all", "extended", "basic", "disabled"] = Field(
        "fastest", description="ORT graph optimization level; fastest = each model at its faster of all/extended")
