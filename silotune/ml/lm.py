"""The causal-LM task: prompts, answer-only labels, per-sequence loss, label scoring.

Classification is cast as instruction following: the model reads a prompt and the
answer is the label word(s) followed by EOS. Training loss covers the answer tokens only
and is averaged per sequence (the DP unit is one sequence). Evaluation scores every
label's log-likelihood as a continuation of the shared prompt, re-using the prompt's KV
cache, and predicts the arg-max.

Training and evaluation read the same prompt: a text too long for `MAX_PROMPT_TOKENS`
loses its end, never the ``Category:`` cue that asks for the answer, in both.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

IGNORE_INDEX = -100
PROMPT = "Text: {text}\nCategory:"
CUE = "\nCategory:"
MAX_LENGTH = 64  # tokens of a training example (prompt + answer) the memory plans assume
MAX_PROMPT_TOKENS = MAX_LENGTH - 8  # a prompt's cap, cue included; answers are appended

log = logging.getLogger(__name__)


def load_model(path: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a transformers causal LM folder in fp32 on the CPU, with its tokenizer."""
    hf_logging.disable_progress_bar()  # one bar per silo per worker is noise, not progress
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The prompt's tokens, at most `MAX_PROMPT_TOKENS`: a longer text keeps its start
    and the cue (tokenized apart), so the model is still asked for the category."""
    ids: list[int] = tokenizer(PROMPT.format(text=text), add_special_tokens=False)["input_ids"]
    if len(ids) <= MAX_PROMPT_TOKENS:
        return ids
    cue: list[int] = tokenizer(CUE, add_special_tokens=False)["input_ids"]
    head: list[int] = tokenizer(PROMPT.format(text=text)[: -len(CUE)],
                                add_special_tokens=False)["input_ids"]
    return head[: MAX_PROMPT_TOKENS - len(cue)] + cue


def truncated_share(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """The share of `texts` whose prompt is cut to `MAX_PROMPT_TOKENS`."""
    if not texts:
        return 0.0
    long = sum(len(tokenizer(PROMPT.format(text=t), add_special_tokens=False)["input_ids"])
               > MAX_PROMPT_TOKENS for t in texts)
    return long / len(texts)


def warn_if_truncated(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                      what: str) -> float:
    """Log how much of `texts` is cut (the held-out split stands for the silos' data,
    whose lengths stay on the silos); returns the share."""
    share = truncated_share(tokenizer, texts)
    if share > 0:
        log.warning("%.0f%% of the %s prompts are longer than %d tokens: their text is cut "
                    "after its first tokens (the 'Category:' cue is kept), in training and "
                    "evaluation alike", 100 * share, what, MAX_PROMPT_TOKENS)
    return share


def answer_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    ids: list[int] = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
    return [*ids, int(tokenizer.eos_token_id)]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt


def encode(tokenizer: PreTrainedTokenizerBase, text: str, label: str) -> EncodedExample:
    """Prompt (`prompt_ids`, as evaluation reads it) + answer; the loss mask keeps the
    answer only."""
    answer = answer_ids(tokenizer, label)
    prompt = prompt_ids(tokenizer, text)
    return EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def encode_frame(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame
                 ) -> list[EncodedExample]:
    """Every (text, label) row of `frame`, encoded for training, in row order."""
    return [encode(tokenizer, text, label)
            for text, label in zip(frame["text"], frame["label"], strict=True)]


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Labels are masked by position, not by token id (pad == EOS)."""
    width = max((len(e.input_ids) for e in batch), default=1)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean answer-token cross-entropy, (B,)."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(lb.shape)
    return tok.sum(1) / (lb != IGNORE_INDEX).sum(1).clamp(min=1)  # (B,)


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer-token cross-entropy."""
    return per_sequence_losses(logits, labels).mean()


def check_labels_differ(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> None:
    """Raise ValueError naming labels that tokenize identically: no score can tell them
    apart, so accuracy on them would be meaningless."""
    seen: dict[tuple[int, ...], str] = {}
    for label in labels:
        ids = tuple(answer_ids(tokenizer, label))
        if ids in seen:
            raise ValueError(f"labels {seen[ids]!r} and {label!r} are the same tokens to this "
                             "model's tokenizer, so no score can tell them apart: merge or "
                             "rename them in the data")
        seen[ids] = label


def colliding_labels(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]
                     ) -> tuple[str, ...]:
    """Labels whose tokens are a prefix of another label's (scoring then tells them
    apart by the end-of-answer token alone)."""
    ids = [answer_ids(tokenizer, lab)[:-1] for lab in labels]
    return tuple(labels[i] for i in range(len(ids))
                 if any(i != j and ids[j][: len(ids[i])] == ids[i] for j in range(len(ids))))


def scored_label_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[list[int]]:
    """Token ids scored for each label: the label's tokens, plus EOS only when some
    label's tokens are a prefix of another's (then EOS is what tells them apart)."""
    ids = [answer_ids(tokenizer, lab)[:-1] for lab in labels]
    if colliding_labels(tokenizer, labels):
        return [[*t, int(tokenizer.eos_token_id)] for t in ids]
    return ids


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache's name in `model`'s forward and output: ``cache`` where transformers
    has it (the old ``past_key_values`` then warns on every call and is removed in 5.40),
    else ``past_key_values``. Using the model's own name, not silencing its warning."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model's own model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def score_labels(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 texts: Sequence[str], labels: Sequence[str],
                 batch_size: int = 32) -> np.ndarray:
    """Log-likelihood of every label (`scored_label_ids`) after each text's prompt, (N, L).

    The prompts of a batch are left-padded and run once: the last position scores every
    label's first token. Only labels longer than one token need a continuation, which
    re-uses the prompt's KV cache, so an example costs one prompt pass plus a few short
    continuations instead of L full sequences.
    """
    pad = int(tokenizer.pad_token_id)
    key = _cache_name(model)
    answers = scored_label_ids(tokenizer, labels)
    first_tok = torch.tensor([a[0] for a in answers])  # (L,)
    multi = [j for j, a in enumerate(answers) if len(a) > 1]
    width = max((len(answers[j]) for j in multi), default=1)
    cont = torch.full((len(multi), max(1, width - 1)), pad, dtype=torch.long)  # (M, Tc)
    target = torch.full_like(cont, pad)
    cont_mask = torch.zeros_like(cont)
    for row, j in enumerate(multi):
        n = len(answers[j]) - 1
        cont[row, :n] = torch.tensor(answers[j][:-1])
        target[row, :n] = torch.tensor(answers[j][1:])
        cont_mask[row, :n] = 1
    out = np.zeros((len(texts), len(labels)), dtype=np.float64)
    for start in range(0, len(texts), batch_size):
        prompts = [prompt_ids(tokenizer, t) for t in texts[start:start + batch_size]]
        b, tp = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, tp), pad, dtype=torch.long)
        mask = torch.zeros((b, tp), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column tp-1
            ids[i, tp - len(p):] = torch.tensor(p)
            mask[i, tp - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                      use_cache=bool(multi), logits_to_keep=1)
        score = first.logits[:, -1].float().log_softmax(-1)[:, first_tok]  # (B, L)
        if multi:
            m = len(multi)
            cache = first[key]
            cache.batch_repeat_interleave(m)  # (B*M, ...)
            rest = model(input_ids=cont.repeat(b, 1),
                         attention_mask=torch.cat([mask.repeat_interleave(m, 0),
                                                   cont_mask.repeat(b, 1)], dim=1),
                         position_ids=pos[:, -1:].repeat_interleave(m, 0) + 1
                         + torch.arange(cont.shape[1]),
                         use_cache=True, **{key: cache})
            lp = rest.logits.float().log_softmax(-1)  # (B*M, Tc, V)
            tok_lp = lp.gather(-1, target.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
            extra = (tok_lp * cont_mask.repeat(b, 1)).sum(-1).view(b, m)  # (B, M)
            score[:, multi] += extra
        out[start:start + b] = score.double().numpy()
    return out


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float  # mean per-sequence answer loss of the true label


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             texts: Sequence[str], gold: Sequence[str], labels: Sequence[str],
             batch_size: int = 32) -> EvalResult:
    """Accuracy by arg-max label log-likelihood; loss = -mean per-token log p(gold answer)."""
    scores = score_labels(model, tokenizer, texts, labels, batch_size)
    index = {lab: j for j, lab in enumerate(labels)}
    gold_idx = np.array([index[g] for g in gold])
    accuracy = float((scores.argmax(1) == gold_idx).mean())
    lengths = np.array([len(ids) for ids in scored_label_ids(tokenizer, labels)])
    loss = float((-scores[np.arange(len(gold)), gold_idx] / lengths[gold_idx]).mean())
    return EvalResult(accuracy=accuracy, loss=loss)
