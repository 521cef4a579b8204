"""The central LLM's side of CrossLM: label-conditioned generation, the feedback-weighted
LoRA update, and the held-out measures (task accuracy, general-text perplexity).

Generation samples every label's prompt in left-padded batches with the KV cache
(``generate``); the update trains a LoRA on two likelihoods per synthetic example,
weighted by the silos' aggregated feedback (silotune/ml/crosslm.py):
``NLL(x | generation prompt(y))`` (better task data next round) and
``NLL(y | task prompt(x))`` (the zero-shot task, silotune/ml/lm.py), then merges it into the
weights. A small learning rate and few steps keep the LLM's general ability
(measured as perplexity on held-out general text). No Flower imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from silotune.ml.crosslm import weighted_loss
from silotune.ml.lm import IGNORE_INDEX, EncodedExample, collate, encode, per_sequence_losses
from silotune.ml.train import LocalTrainConfig, attach_lora

INSTRUCTION = ('Write one short {subject} for the category "{label}". '
               "Reply with the {subject} only, on one line.")
# What a task's texts are, for the generation prompt (registered datasets; else "text").
SUBJECTS: dict[str, str] = {"icd10-chapters": "ICD-10-CM diagnosis title"}


@dataclass(frozen=True)
class SyntheticExample:
    text: str
    label: str  # the intended label the text was generated for


def generation_prompt(tok: PreTrainedTokenizerBase, label: str, subject: str = "text"
                      ) -> list[int]:
    """Token ids asking for one `subject` of `label` (chat template when the model has
    one)."""
    instruction = INSTRUCTION.format(label=label, subject=subject)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": instruction}],
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        return [int(i) for i in ids]  # type: ignore[arg-type]
    plain: list[int] = tok(f"{instruction}\nText:", add_special_tokens=False)["input_ids"]
    return plain


def _clean(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line.strip('"').strip()


@torch.no_grad()
def generate_examples(model: torch.nn.Module, tok: PreTrainedTokenizerBase,
                      labels: Sequence[str], per_label: int, max_new_tokens: int,
                      seed: int, subject: str = "text", batch_size: int = 32
                      ) -> list[SyntheticExample]:
    """`per_label` sampled texts for every label (temperature 1, top-p 0.9, top-k 50, as
    FDKT), first line only; empty generations are dropped. Seeded by the public `seed`."""
    wanted = [lab for lab in labels for _ in range(per_label)]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    out: list[SyntheticExample] = []
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            prompts = [generation_prompt(tok, lab, subject) for lab in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding: generation continues at the end
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,  # type: ignore[operator]
                                 temperature=1.0, top_p=0.9, top_k=50, use_cache=True,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
            out += [SyntheticExample(_clean(t), lab) for t, lab in zip(texts, chunk, strict=True)
                    if _clean(t)]
    return out


def encode_generation(tok: PreTrainedTokenizerBase, example: SyntheticExample,
                      subject: str = "text", max_length: int = 96) -> EncodedExample:
    """Generation prompt(y) + x + EOS; the loss covers x and EOS only."""
    prompt = generation_prompt(tok, example.label, subject)
    answer = [*tok(example.text, add_special_tokens=False)["input_ids"], int(tok.eos_token_id)]
    answer = answer[: max(1, max_length - len(prompt))]
    return EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


@dataclass(frozen=True)
class LLMUpdateConfig:
    steps: int
    learning_rate: float
    batch_size: int = 16  # synthetic examples per step (two sequences each)
    physical_batch_size: int = 8  # sequences per forward pass (gradients accumulate)
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0  # public: LoRA init and batch order
    subject: str = "text"  # as given to generate_examples


def update_llm(model: torch.nn.Module, tok: PreTrainedTokenizerBase,
               examples: Sequence[SyntheticExample], weights: np.ndarray,
               cfg: LLMUpdateConfig) -> tuple[torch.nn.Module, float]:
    """Feedback-weighted LoRA update, merged; returns (new model, mean weighted loss).

    Examples with weight 0 are never drawn. With no positive weight the model is returned
    unchanged (loss 0).
    """
    live = [j for j in range(len(examples)) if weights[j] > 0]
    if not live:
        return model, 0.0
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen = [encode_generation(tok, examples[j], cfg.subject) for j in live]
    task = [encode(tok, examples[j].text, examples[j].label) for j in live]
    w = torch.tensor(np.asarray(weights)[live], dtype=torch.float32)
    peft = attach_lora(model, LocalTrainConfig(
        rank=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets, local_steps=cfg.steps,
        batch_size=cfg.batch_size, physical_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, init_seed=cfg.seed))
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        pick = torch.randperm(len(live), generator=order)[: cfg.batch_size].tolist()
        seqs = [gen[i] for i in pick] + [task[i] for i in pick]
        weight = torch.cat([w[pick], w[pick]])  # (2b,)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, len(seqs), cfg.physical_batch_size):  # accumulate: bounded memory
            batch = collate(seqs[lo:lo + cfg.physical_batch_size], pad)
            out = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            part = weight[lo:lo + cfg.physical_batch_size]
            per_seq = per_sequence_losses(out.logits, batch["labels"])  # (chunk,)
            # the chunk's share of weighted_loss over the whole batch of 2b sequences
            loss = weighted_loss(per_seq, part) * (len(part) / len(seqs))
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    merged = peft.merge_and_unload()  # type: ignore[operator]
    merged.eval()
    return merged, float(np.mean(losses))


@torch.no_grad()
def perplexity(model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str],
               max_length: int = 128, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all tokens of `texts` (each cut at `max_length`)."""
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(texts), batch_size):
        seqs = [tok(t, add_special_tokens=False)["input_ids"][:max_length]
                for t in texts[start:start + batch_size]]
        batch = collate([EncodedExample(s, list(s)) for s in seqs if len(s) > 1], pad)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_seq = per_sequence_losses(out.logits, batch["labels"])
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # predicted tokens per text
        total += float((per_seq * n).sum())
        count += int(n.sum())
    if count == 0:
        raise ValueError("no general text to measure perplexity on")
    return float(np.exp(total / count))
