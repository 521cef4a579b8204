"""Frozen, validated run configuration, built once at the boundary.

The same `RunConfig` is built from `silotune simulate` flags, from Flower's run config
(`[tool.flwr.app.config]` in pyproject.toml, kebab-case keys) and from tests. Unknown keys
and out-of-range values raise `ConfigError` naming the key and the allowed range. Names
that a registry of a higher layer owns (partition method, profile mix, base precision) are
checked against it by `silotune.simulations.checks.check_names`: this module imports
nothing from silotune.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def _parse_csv(value: Any, cast: type) -> tuple[Any, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    return tuple(cast(p) for p in parts)


@dataclass(frozen=True)
class RunConfig:
    """One federation: model, data, strategy, training and privacy settings.

    Attributes mirror the kebab-case keys of `[tool.flwr.app.config]`
    (``num-server-rounds`` is `rounds`, ``lora-ranks`` is `lora_ranks`, ...).
    """

    model: str = "smollm2-135m-instruct"
    dataset: str = "icd10-chapters"
    text_column: str = "text"
    label_column: str = "label"
    strategy: str = "flora"
    num_silos: int = 4
    rounds: int = 4
    fraction_train: float = 1.0
    min_replies: int = 1
    local_steps: int = 5
    batch_size: int = 32
    physical_batch_size: int = 32
    learning_rate: float = 1e-2
    lora_ranks: tuple[int, ...] = (8, 4, 8, 4)
    lora_alpha_per_rank: float = 2.0
    lora_targets: tuple[str, ...] = ("auto",)  # the model's attention projections
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    dirichlet_alpha: float = 0.5  # skew of the "dirichlet" (labels) and "size" partitions
    partition: str = "dirichlet"  # how rows are split over silos: iid, dirichlet, natural, size
    test_size: int = 330
    eval_batch_size: int = 32
    wire_dtype: str = "fp16"
    upload_density: float = 1.0  # < 1: ComPEFT-style top-k ternary compression of uploads
    # Replies with ||s B A||_F above this are excluded. None ("auto"): per reply, the
    # most the round's training can produce times a margin (docs/algorithms.md §11).
    max_update_norm: float | None = None
    # Client-level DP (DP-FedAvg, unit = one silo): noise multiplier z (0 = off) and the
    # clip norm C of each silo's whole update (silotune/privacy/client_level.py).
    client_dp_noise: float = 0.0
    client_dp_clip: float = 1.0
    seed: int = 0
    # Simulation only: >= 0 seeds every simulated silo's DP noise from this public number
    # (reproducible comparisons; the noise is then known to whoever knows it). -1: the OS
    # seeds it, as always in deployments (deployed silos ignore this key).
    dp_noise_seed: int = -1
    # Run mode: "lora" (federated LoRA) or "crosslm" (mutual enhancement of the central
    # LLM `model` and silo SLMs `slm`, silotune/server/crosslm.py).
    mode: str = "lora"
    slm: str = "minilm-l6"  # crosslm: silo classifier (registered name or encoder folder)
    slm_steps: int = 20  # crosslm: DP-SGD steps per SLM training (and synthetic steps)
    slm_learning_rate: float = 0.05
    crosslm_per_label: int = 8  # synthetic examples per label per round (0: private only)
    crosslm_threshold: float = 0.1  # keep synthetic examples with feedback >= this
    crosslm_weighting: str = "feedback"  # LLM update: "feedback" or "uniform" (ablation)
    llm_steps: int = 10  # crosslm: LoRA steps of the central LLM per round
    llm_learning_rate: float = 1e-3
    max_new_tokens: int = 20
    # FedPipe auto-configuration: "" off; a mix name (simulation) or "node" (each silo's
    # node config) gives every silo its own targets, rank, batch and base precision.
    profiles: str = ""
    plan_mode: str = "per-silo"  # or "uniform": every silo gets the weakest silo's plan
    calibration_steps: int = 4  # importance scoring: mini-batches on each silo
    calibration_batch: int = 8
    base_precision: str = "fp32"  # training copy of the base when profiles are off
    out_dir: str = "runs/latest"
    round_timeout: float = 3600.0  # seconds to wait for a round's replies; late silos dropped
    resume: bool = False  # continue from out_dir/checkpoint (server/checkpoint.py)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.num_silos >= 1, "num_silos", self.num_silos, ">= 1")
        _check(self.rounds >= 1, "rounds", self.rounds, ">= 1")
        _check(0.0 < self.fraction_train <= 1.0, "fraction_train", self.fraction_train, "(0, 1]")
        _check(self.min_replies >= 1, "min_replies", self.min_replies, ">= 1")
        _check(self.local_steps >= 1, "local_steps", self.local_steps, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.physical_batch_size >= 1, "physical_batch_size",
               self.physical_batch_size, ">= 1")
        _check(0.0 < self.learning_rate < 1.0, "learning_rate", self.learning_rate, "(0, 1)")
        _check(len(self.lora_ranks) >= 1 and all(1 <= r <= 1024 for r in self.lora_ranks),
               "lora_ranks", self.lora_ranks, "a non-empty list of integers in [1, 1024]")
        _check(self.lora_alpha_per_rank > 0, "lora_alpha_per_rank",
               self.lora_alpha_per_rank, "> 0")
        _check(len(self.lora_targets) >= 1, "lora_targets", self.lora_targets,
               "a non-empty list of module names such as q_proj,v_proj")
        _check(self.target_epsilon > 0 and not math.isnan(self.target_epsilon),
               "target_epsilon", self.target_epsilon, "> 0 (or inf for a non-private run)")
        _check(0.0 < self.target_delta < 0.1, "target_delta", self.target_delta, "(0, 0.1)")
        _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.dirichlet_alpha > 0, "dirichlet_alpha", self.dirichlet_alpha, "> 0")
        _check(self.test_size >= 1, "test_size", self.test_size, ">= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(self.dp_noise_seed >= -1, "dp_noise_seed", self.dp_noise_seed,
               ">= 0 (simulation: seeded DP noise) or -1 (OS-seeded noise)")
        _check(self.wire_dtype in ("fp16", "fp32"), "wire_dtype", self.wire_dtype,
               "fp16 or fp32")
        _check(0.0 < self.upload_density <= 1.0, "upload_density", self.upload_density,
               "(0, 1]; 1 means no compression")
        _check(self.mode in ("lora", "crosslm"), "mode", self.mode, "lora or crosslm")
        _check(self.slm_steps >= 1, "slm_steps", self.slm_steps, ">= 1")
        _check(0.0 < self.slm_learning_rate < 1.0, "slm_learning_rate",
               self.slm_learning_rate, "(0, 1)")
        _check(self.crosslm_per_label >= 0, "crosslm_per_label", self.crosslm_per_label,
               ">= 0 (0: SLMs on private data only)")
        _check(0.0 <= self.crosslm_threshold <= 1.0, "crosslm_threshold",
               self.crosslm_threshold, "[0, 1]")
        _check(self.crosslm_weighting in ("feedback", "uniform"), "crosslm_weighting",
               self.crosslm_weighting, "feedback or uniform")
        _check(self.llm_steps >= 1, "llm_steps", self.llm_steps, ">= 1")
        _check(0.0 < self.llm_learning_rate < 1.0, "llm_learning_rate",
               self.llm_learning_rate, "(0, 1)")
        _check(1 <= self.max_new_tokens <= 512, "max_new_tokens", self.max_new_tokens,
               "[1, 512]")
        _check(self.max_update_norm is None or self.max_update_norm > 0, "max_update_norm",
               self.max_update_norm, "> 0, or auto (derived from the training's learning "
               "rate, local steps and rank)")
        _check(self.round_timeout > 0, "round_timeout", self.round_timeout, "> 0 seconds")
        _check(math.isfinite(self.client_dp_noise) and self.client_dp_noise >= 0,
               "client_dp_noise", self.client_dp_noise, ">= 0; 0 turns client-level DP off")
        _check(math.isfinite(self.client_dp_clip) and self.client_dp_clip > 0,
               "client_dp_clip", self.client_dp_clip, "> 0")
        _check(self.client_dp_noise == 0 or self.strategy == "flora", "strategy",
               self.strategy, "flora when client_dp_noise > 0 (the only rule whose merge is "
               "linear in the silo updates)")
        # FedPipe gives silos different modules, and FLoRA averages a module over the silos
        # that adapt it: one silo alone on a module would carry weight 1 there, so the
        # client-level sensitivity C would not hold (docs/privacy.md §4).
        _check(self.client_dp_noise == 0 or not self.profiles, "profiles", self.profiles,
               "empty when client_dp_noise > 0 (FedPipe's per-silo modules break the "
               "client-level sensitivity bound)")
        _check(self.plan_mode in ("per-silo", "uniform"), "plan_mode", self.plan_mode,
               "per-silo or uniform")
        _check(self.calibration_steps >= 1, "calibration_steps", self.calibration_steps,
               ">= 1")
        _check(self.calibration_batch >= 1, "calibration_batch", self.calibration_batch,
               ">= 1")

    @property
    def private(self) -> bool:
        """False for a non-private run (``target_epsilon = inf``): no DP guarantee at all."""
        return math.isfinite(self.target_epsilon)

    def rank_of(self, silo_index: int) -> int:
        """LoRA rank of the silo at `silo_index` (ranks cycle over the silos)."""
        return self.lora_ranks[silo_index % len(self.lora_ranks)]

    # -- Flower run config (kebab-case, flat scalars) -------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a flat mapping with kebab-case or snake_case keys; unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = _FLOWER_ALIASES.get(raw_key, raw_key.replace("-", "_"))
            if key not in known:
                valid = ", ".join(sorted(cls().to_flower()))
                raise ConfigError(f"unknown config key '{raw_key}'; valid keys: {valid}")
            kwargs[key] = _coerce(key, value)
        return cls(**kwargs)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's run-config value types (lists as comma-separated strings)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, float) and math.isinf(value):
                value = "inf"
            elif value is None:  # a value derived at run time
                value = AUTO
            out[flower_key(f.name)] = value
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (snake_case keys; inf written as the string "inf")."""
        return {k.replace("-", "_"): v for k, v in self.to_flower().items()}


_FLOWER_ALIASES = {"num-server-rounds": "rounds"}
AUTO = "auto"  # the Flower value of an optional setting that is derived at run time


def flower_key(name: str) -> str:
    """The kebab-case key of `RunConfig` field `name` in `[tool.flwr.app.config]`: also
    the name of its `silotune simulate` flag and of its key in a ``--config`` file."""
    inverse = {v: k for k, v in _FLOWER_ALIASES.items()}
    return inverse.get(name, name.replace("_", "-"))


def _coerce(key: str, value: Any) -> Any:
    target = {f.name: f for f in dataclasses.fields(RunConfig)}[key]
    kind = str(target.type)
    try:
        if kind.startswith("tuple[int"):
            return _parse_csv(value, int)
        if kind.startswith("tuple[str"):
            return _parse_csv(value, str)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "float | None":
            return None if value in (None, AUTO) else float(value)
        if kind == "str":
            return str(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {kind}") from err
    return value


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")


# -- How each setting appears to users ---------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """How one `RunConfig` field appears to users (docs/architecture.md, "one vocabulary").

    Its name everywhere is `flower_key` (the key of ``[tool.flwr.app.config]``): the
    ``silotune simulate`` flag ``--<key>``, the key in a ``--config`` file and in ``flwr
    run --run-config``. `aliases` are older flag names that keep working; `choices` are
    fixed names checked here; `registry` names a higher layer's registry that owns the
    valid names (resolved by ``silotune/cli_flags.py``).
    """

    help: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    registry: str = ""
    metavar: str = ""


# One entry per RunConfig field (tests/unit/test_config.py checks that none is missing).
SETTINGS: dict[str, Setting] = {
    "model": Setting("registered model name or a transformers causal-LM folder"),
    "dataset": Setting("registered dataset or a .jsonl/.json/.csv/.parquet file"),
    "text_column": Setting("text column of a dataset file"),
    "label_column": Setting("label column of a dataset file"),
    "strategy": Setting("aggregation rule", registry="strategies"),
    "num_silos": Setting("number of silos", ("--silos",), metavar="N"),
    "rounds": Setting("federated rounds", ("--rounds",), metavar="N"),
    "fraction_train": Setting("fraction of silos sampled per round", ("--fraction",)),
    "min_replies": Setting("silos sampled per round at least (whatever the fraction)",
                           metavar="N"),
    "local_steps": Setting("local optimiser steps per round", metavar="N"),
    "batch_size": Setting("expected (Poisson) batch size of DP-SGD", metavar="N"),
    "physical_batch_size": Setting("examples per forward/backward pass (memory only; "
                                   "the logical batch is --batch-size)", metavar="N"),
    "learning_rate": Setting("learning rate", ("--lr",)),
    "lora_ranks": Setting("LoRA ranks, comma-separated, cycled over the silos",
                          ("--ranks",), metavar="R,R,..."),
    "lora_alpha_per_rank": Setting("LoRA alpha divided by the rank (alpha = this x r)"),
    "lora_targets": Setting("modules that get a LoRA, comma-separated; auto: the model's "
                            "attention projections (e.g. q_proj,v_proj for Llama, c_attn "
                            "for GPT-2)", metavar="auto|NAME,..."),
    "target_epsilon": Setting("each silo's total epsilon budget; inf = non-private",
                              ("--epsilon",)),
    "target_delta": Setting("DP delta", ("--delta",)),
    "max_grad_norm": Setting("DP-SGD per-example clip norm"),
    "dirichlet_alpha": Setting("Dirichlet concentration of the dirichlet and size "
                               "partitions; small = strong skew", ("--alpha",)),
    "partition": Setting("how the training rows are split over silos: dirichlet (label "
                         "skew), iid, natural (whole label groups per silo), size (silo "
                         "sizes skewed)", registry="partitioners"),
    "test_size": Setting("held-out examples for evaluation (at most half the rows)",
                         metavar="N"),
    "eval_batch_size": Setting("examples per evaluation batch", metavar="N"),
    "wire_dtype": Setting("float type of adapters on the wire", choices=("fp16", "fp32")),
    "upload_density": Setting("keep this fraction of each uploaded adapter's changes, as "
                              "signs and one scale per tensor (ComPEFT-style); 1 = off",
                              ("--compress",), metavar="DENSITY"),
    "max_update_norm": Setting("exclude replies whose update norm ||s B A|| exceeds this"),
    "client_dp_noise": Setting("client-level DP (DP-FedAvg, unit = one silo): noise "
                               "multiplier of the coordinator's Gaussian noise; 0 = off",
                               metavar="Z"),
    "client_dp_clip": Setting("client-level DP: clip norm of each silo's update ||s B A||",
                              metavar="C"),
    "seed": Setting("public seed: data split, silo sampling, LoRA init; never DP noise"),
    "dp_noise_seed": Setting("seed the simulated silos' DP noise from N, so that two runs "
                             "differ only by what you changed (research comparisons; the "
                             "ledgers record it, and the noise is predictable to anyone who "
                             "knows N); -1 = OS-seeded noise, as in every deployment",
                             metavar="N"),
    "mode": Setting("lora: federated LoRA; crosslm: central LLM (--model) and silo SLMs "
                    "(--slm) improve each other through scored synthetic data",
                    choices=("lora", "crosslm")),
    "slm": Setting("crosslm: silo small model, a registered name or an encoder folder"),
    "slm_steps": Setting("crosslm: DP-SGD steps per SLM training", metavar="N"),
    "slm_learning_rate": Setting("crosslm: SLM learning rate", ("--slm-lr",)),
    "crosslm_per_label": Setting("crosslm: synthetic examples per label per round; 0 = "
                                 "SLMs on private data alone", ("--per-label",), metavar="N"),
    "crosslm_threshold": Setting("crosslm: keep synthetic examples with feedback >= this",
                                 ("--threshold",)),
    "crosslm_weighting": Setting("crosslm: LLM update weights, SLM feedback or uniform "
                                 "(ablation)", ("--weighting",),
                                 choices=("feedback", "uniform")),
    "llm_steps": Setting("crosslm: LoRA steps of the central LLM per round", metavar="N"),
    "llm_learning_rate": Setting("crosslm: LLM learning rate", ("--llm-lr",)),
    "max_new_tokens": Setting("crosslm: tokens per generated example", metavar="N"),
    "profiles": Setting("FedPipe automatic configuration: silo resource profiles from a "
                        "named mix; each silo gets its own targets, rank, batch and base "
                        "precision (empty = off)", registry="profile mixes", metavar="MIX"),
    "plan_mode": Setting("FedPipe: per-silo, each silo's own optimum; uniform, every silo "
                         "gets the configuration that fits the weakest profile",
                         choices=("per-silo", "uniform")),
    "calibration_steps": Setting("FedPipe importance scoring: mini-batches on each silo",
                                 metavar="N"),
    "calibration_batch": Setting("FedPipe importance scoring: examples per mini-batch",
                                 metavar="N"),
    "base_precision": Setting("base precision of every silo's training copy when "
                              "--profiles is off", ("--precision",), registry="precisions"),
    "out_dir": Setting("output folder", ("--out",), metavar="DIR"),
    "round_timeout": Setting("seconds to wait for a round's replies; late silos are "
                             "dropped from the round", metavar="SECONDS"),
    "resume": Setting("continue the federation whose checkpoint is in OUT/checkpoint (its "
                      "silos keep their ledgers and spent budgets)"),
}
