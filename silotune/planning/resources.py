"""FedPipe's explicit memory and time model of one silo's training round.

Fang et al., "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of Large
Language Models" (arXiv 2404.06448); the constraints follow docs/algorithms.md §6:

    memory  = q/8 |theta_0| + LoRA state + b * (per-sample gradients + ACT(seq))  <= M_i
    time    = E * b * FLOPs(seq, {r}) / f_i + |adapter| (1/beta_up + 1/beta_down) <= T_i

Pure Python: no torch, no Flower. `ModelSpec` describes the base model (parameter count,
vocabulary, width, depth, and the (d_out, d_in) of every candidate matrix); `Choice` is
one configuration (targets, rank, micro-batch, base precision). The activation terms are
counts of the tensors alive at the peak of a DP-SGD step (Opacus hooks mode), per token:
the logits and their gradient (fp32, V floats each, ``LOGIT_COPIES`` of them) and
``LAYER_COPIES`` hidden-size tensors per decoder layer at the base's precision; the two
counts were fitted on calibration runs and are checked against measured peaks of the
default model in ``benchmarks/results/fedpipe_memory.json`` (tests/unit/planning/test_resources.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from silotune.ml import precision

# Candidate weight matrices of a decoder layer (Llama naming), FedPipe's W_q, W_k, W_v,
# W_o plus the MLP.
CANDIDATES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                               "gate_proj", "up_proj", "down_proj")
# Matrices that read the same activation (Llama): q, k, v the attention input; gate, up
# the MLP input.
INPUT_OF: Mapping[str, str] = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
                               "gate_proj": "mlp_in", "up_proj": "mlp_in"}
LORA_STATE_COPIES = 5  # fp32 LoRA value, gradient, AdamW's two moments, Opacus' summed grad
# One fp32 logits tensor (B, T, V) is alive at the peak; the two other counts were fitted
# (least squares, then rounded) on the three batch-32 configurations measured on the
# default model (benchmarks/fedpipe_memory.py, rows 1-3 of its results) and checked on
# the three others (smaller batches): every row within +11% / -5% of its measurement.
LOGIT_COPIES = 1.0  # per token: fp32 vocabulary-size tensors alive at the peak
LAYER_COPIES = 23.0  # per token and decoder layer: hidden-size tensors saved for backward
LORA_ACT_COPIES = 3.25  # per token: copies of the adapters' fp32 inputs (`lora_input_width`)
RUNTIME_OVERHEAD = 64 * 2 ** 20  # allocator and autograd bookkeeping of a training step
WIRE_BYTES = 2.0  # fp16 adapters on the wire


@dataclass(frozen=True)
class ModelSpec:
    """What the memory and time model needs to know about a base model."""

    num_params: int  # |theta_0|, tied weights counted once
    vocab_size: int
    hidden_size: int
    num_layers: int
    matrices: Mapping[str, tuple[tuple[int, int], ...]]  # type -> (d_out, d_in) per layer

    def lora_params(self, targets: tuple[str, ...], rank: int) -> int:
        """Number of LoRA parameters: r (d_in + d_out) summed over the adapted matrices."""
        missing = [t for t in targets if t not in self.matrices]
        if missing:
            raise ValueError(f"the model has no matrices named {missing}; candidates: "
                             f"{sorted(self.matrices)}")
        return rank * sum(d_out + d_in for t in targets for d_out, d_in in self.matrices[t])

    def lora_input_width(self, targets: tuple[str, ...], shared: bool) -> int:
        """Floats per token that the adapters keep for their backward: the input of each
        adapted matrix (once per input when `shared`, i.e. the adapters read the base's
        own fp32 activation; once per matrix when each casts its own copy) plus the
        rank-r output of each A (added by the caller)."""
        width = 0
        for layer in range(self.num_layers):
            inputs: dict[str, int] = {}
            for t in targets:
                key = INPUT_OF.get(t, t) if shared else t
                inputs[key] = self.matrices[t][layer][1]  # d_in
            width += sum(inputs.values())
        return width


@dataclass(frozen=True)
class Choice:
    """One silo configuration: adapted matrix types, LoRA rank, micro-batch, precision."""

    targets: tuple[str, ...]
    rank: int
    batch: int
    precision: str


def memory_bytes(spec: ModelSpec, choice: Choice, seq_len: int) -> float:
    """Peak bytes of one DP-SGD training round (the silo's training working set).

    base copy at its precision + LoRA state + per-sample LoRA gradients (Opacus) +
    activations of a micro-batch of `choice.batch` sequences of `seq_len` tokens.
    """
    q = precision.get(choice.precision).bytes_per_param
    n_lora = spec.lora_params(choice.targets, choice.rank)
    base = q * spec.num_params
    lora_state = 4.0 * LORA_STATE_COPIES * n_lora
    per_sample = 4.0 * choice.batch * n_lora  # grad_sample: (b, *param) per LoRA factor
    per_token = (4.0 * LOGIT_COPIES * spec.vocab_size
                 + q * LAYER_COPIES * spec.hidden_size * spec.num_layers
                 + 4.0 * LORA_ACT_COPIES * spec.lora_input_width(
                     choice.targets, shared=choice.precision == "fp32")
                 + 4.0 * choice.rank * len(choice.targets) * spec.num_layers)
    return base + lora_state + per_sample + choice.batch * seq_len * per_token \
        + RUNTIME_OVERHEAD


def flops_per_example(spec: ModelSpec, choice: Choice, seq_len: int) -> float:
    """FLOPs of one example in one step: forward (2 P T) and input-gradient backward
    (2 P T) through the frozen base, plus LoRA forward, backward and per-sample
    gradients (8 n T)."""
    n_lora = spec.lora_params(choice.targets, choice.rank)
    return seq_len * (4.0 * spec.num_params + 8.0 * n_lora)


def upload_bytes(spec: ModelSpec, choice: Choice) -> float:
    """Bytes of the silo's adapter on the wire (A and B, fp16)."""
    return WIRE_BYTES * spec.lora_params(choice.targets, choice.rank)


@dataclass(frozen=True)
class Budget:
    """What one round may cost a silo (from its resource profile)."""

    memory_bytes: float
    flops_per_second: float
    upload_bytes_per_second: float
    download_bytes_per_second: float
    round_seconds: float
    local_steps: int
    seq_len: int


def round_seconds(spec: ModelSpec, choice: Choice, budget: Budget) -> float:
    """tau_i: compute of `local_steps` steps of `batch` examples, plus adapter transfer up
    and down (the spec's 2 |adapter| / beta with separate up/down bandwidths)."""
    compute = budget.local_steps * choice.batch * flops_per_example(spec, choice,
                                                                    budget.seq_len)
    size = upload_bytes(spec, choice)
    return (compute / budget.flops_per_second + size / budget.upload_bytes_per_second
            + size / budget.download_bytes_per_second)


def rank_utility(rank: int) -> float:
    """phi(r) = log2(1 + r): a larger rank helps, with diminishing returns; phi(0) = 0."""
    return math.log2(1 + rank)
