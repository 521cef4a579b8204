"""The coordinator's CrossLM workflow on Flower's Grid (``--mode crosslm``).

Round 0: every silo trains its SLM on its private data with DP-SGD ("train.slm").
Rounds 1..R (silotune/ml/crosslm.py has the math, docs/algorithms.md §7 the design):

1. the central LLM generates `crosslm_per_label` texts for every label;
2. every silo scores them with its SLM ("query.score") and returns the scores only;
3. the scores are combined (w_k = n_k / sum n), the LLM gets a feedback-weighted LoRA
   update (merged), the examples with feedback >= threshold are kept;
4. every silo trains its SLM on the kept synthetic set plus its private data.

Each round records SLM accuracy (mean and per silo, held-out), LLM task accuracy
(zero-shot, label likelihood) and perplexity on held-out general text, the synthetic set
size and mean score into ``metrics.json``; the synthetic sets go to ``synthetic.jsonl``.
With ``crosslm_per_label = 0`` the same schedule trains the SLMs on private data alone
(the baseline).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from silotune.config import RunConfig
from silotune.files import atomic_write_json
from silotune.ml.assets import general_text, resolve_model
from silotune.ml.crosslm import (
    FeedbackRefusedError,
    aggregate_feedback,
    check_feedback_allowed,
    example_weights,
    keep_mask,
    summarise,
)
from silotune.ml.data import held_out_split
from silotune.ml.lm import evaluate, load_model
from silotune.ml.synthetic import (
    SUBJECTS,
    LLMUpdateConfig,
    SyntheticExample,
    generate_examples,
    perplexity,
    update_llm,
)
from silotune.progress import Emit
from silotune.protocol import keys as P
from silotune.protocol.messages import (
    MessageError,
    ScoreReply,
    ScoreRequest,
    SlmTrainReply,
    SlmTrainRequest,
)
from silotune.server import registry
from silotune.server.report import write_report
from silotune.server.roster import Roster, Silo, broadcast
from silotune.server.validate import aggregation_weights

log = logging.getLogger(__name__)
FEEDBACK_METRICS = frozenset({P.SCORES, P.NUM_EXAMPLES, P.SLM_DP})
FEEDBACK_INFO = frozenset({P.SILO_ID, P.LEDGER_HEAD})
HELLO_RETRIES = 4
GENERAL_TEXTS = 20  # held-out BBC News openings for the LLM's general-text perplexity


def validate_feedback(reply: Message, expected: int, private_run: bool
                      ) -> tuple[list[float], int | None]:
    """The scores and example count of a score reply; raises ValueError (or
    FeedbackRefusedError) when it carries anything but scores, has the wrong length, values
    outside [0, 1], or comes from a non-DP SLM in a private run."""
    content = reply.content
    if content.array_records:
        raise ValueError("feedback reply carries arrays (weights or gradients); only scores "
                         "are accepted")
    metrics = content.metric_records.get(P.METRICS)
    if metrics is None or set(content.metric_records) != {P.METRICS}:
        raise ValueError("feedback reply must hold exactly one metric record 'metrics'")
    extra = set(metrics) - FEEDBACK_METRICS
    info = content.config_records.get(P.INFO)
    extra |= set(content.config_records) - {P.INFO}
    extra |= set(info or {}) - FEEDBACK_INFO
    if extra:
        raise ValueError(f"feedback reply carries unexpected fields {sorted(extra)}")
    answer = ScoreReply.from_message(reply)
    check_feedback_allowed(answer.slm_dp, private_run)
    if len(answer.scores) != expected:
        raise ValueError(f"feedback reply has {len(answer.scores)} scores, expected {expected}")
    if not all(0.0 <= v <= 1.0 for v in answer.scores):
        raise ValueError("feedback scores must be probabilities in [0, 1]")
    return answer.scores, answer.num_examples


def run_crosslm(grid: Grid, cfg: RunConfig, progress: Emit = print) -> dict[str, Any]:
    """Run `cfg.rounds` CrossLM rounds; write metrics.json, synthetic.jsonl, report."""
    out = Path(cfg.out_dir)
    (out / "ledgers").mkdir(parents=True, exist_ok=True)
    llm = CentralLLM(cfg, progress)
    t0 = time.monotonic()
    base = llm.evaluate()
    progress(f"[base LLM] task accuracy {base['accuracy']:.3f}, general-text perplexity "
             f"{base['perplexity']:.2f} ({len(llm.texts)} held-out examples, "
             f"{len(llm.general)} general texts, {time.monotonic() - t0:.0f} s)")
    silos = _hello_everyone(Roster(grid, cfg), cfg, progress)
    metrics: dict[str, Any] = {
        "config": cfg.to_json_dict(), "private": cfg.private, "mode": "crosslm",
        "base_accuracy": base["accuracy"], "base_loss": base["loss"],
        "base_perplexity": base["perplexity"], "rounds": []}
    synthetic_file = out / "synthetic.jsonl"
    synthetic_file.unlink(missing_ok=True)
    kept: list[SyntheticExample] = []
    epsilon: dict[str, float] = {}
    limits: dict[str, float] = {}
    llm_now = base
    for round_ in range(0, cfg.rounds + 1):
        start = time.monotonic()
        row: dict[str, Any] = {"round": round_, "bytes_up": 0, "bytes_down": 0}
        excluded: list[dict[str, str]] = []
        if round_ > 0 and cfg.crosslm_per_label > 0:
            kept, excluded = llm.learn_from_feedback(grid, silos, round_, row, synthetic_file)
            llm_now = llm.evaluate()
        row.update(llm_now)  # the LLM as it is after this round (unchanged in round 0)
        slm, slm_excluded = _train_slms(grid, cfg, silos, round_, llm.labels, kept, epsilon,
                                        limits, row)
        row.update({
            "slm_accuracy": slm,
            "slm_accuracy_mean": float(np.mean(list(slm.values()))) if slm else 0.0,
            "epsilon": dict(sorted(epsilon.items())),
            "epsilon_limit": dict(sorted(limits.items())),
            "excluded": excluded + slm_excluded,
            "seconds": round(time.monotonic() - start, 3)})
        metrics["rounds"].append(row)
        atomic_write_json(out / "metrics.json", metrics)
        progress(_round_line(row, cfg.rounds))
    write_report(out)
    return metrics


def _round_line(row: dict[str, Any], rounds: int) -> str:
    return (f"[round {row['round']}/{rounds}] LLM accuracy {row['accuracy']:.3f}, "
            f"perplexity {row['perplexity']:.2f}, synthetic kept "
            f"{row.get('synthetic_kept', 0)}/{row.get('synthetic_size', 0)} (mean score "
            f"{row.get('mean_score', 0.0):.3f}), SLM accuracy mean "
            f"{row['slm_accuracy_mean']:.3f}, {row['seconds']:.0f} s"
            + (f", excluded {row['excluded']}" if row["excluded"] else ""))


def _hello_everyone(roster: Roster, cfg: RunConfig, progress: Emit) -> dict[str, Silo]:
    """Every silo (asked again while some are still starting, e.g. on a loaded machine)."""
    silos = roster.everyone()
    for _ in range(HELLO_RETRIES):
        if len(silos) >= cfg.num_silos:
            break
        silos = roster.everyone()
    if not silos:
        raise RuntimeError(f"no silo answered the hello ({HELLO_RETRIES + 1} tries); check "
                           "that the silos run and can reach the coordinator")
    progress(f"[hello] {len(silos)} silos: " + ", ".join(
        f"{s} (n={v.num_examples if v.num_examples is not None else 'undeclared'})"
        for s, v in sorted(silos.items())))
    return silos


class CentralLLM:
    """The central LLM, its task's held-out split and general texts for perplexity."""

    def __init__(self, cfg: RunConfig, progress: Emit) -> None:
        self.cfg = cfg
        self.model, self.tok = load_model(resolve_model(cfg.model, progress=progress))
        split = held_out_split(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_size,
                               cfg.seed)
        self.labels = list(split.labels)
        self.texts, self.gold = list(split.test["text"]), list(split.test["label"])
        self.general = general_text(GENERAL_TEXTS)
        self.subject = SUBJECTS.get(cfg.dataset, "text")

    def evaluate(self) -> dict[str, float]:
        """Task accuracy and loss (held-out, label likelihood), general-text perplexity."""
        res = evaluate(self.model, self.tok, self.texts, self.gold, self.labels,
                       self.cfg.eval_batch_size)
        return {"accuracy": res.accuracy, "loss": res.loss,
                "perplexity": perplexity(self.model, self.tok, self.general)}

    def learn_from_feedback(self, grid: Grid, silos: dict[str, Silo], round_: int,
                            row: dict[str, Any], synthetic_file: Path,
                            ) -> tuple[list[SyntheticExample], list[dict[str, str]]]:
        """Generate, ask the silos for feedback, update the LLM by it; the examples
        kept for the SLMs and the silos excluded."""
        cfg = self.cfg
        examples = generate_examples(self.model, self.tok, self.labels, cfg.crosslm_per_label,
                                     cfg.max_new_tokens, seed=cfg.seed * 1009 + round_,
                                     subject=self.subject)
        feedback, excluded = _feedback(grid, cfg, silos, round_, self.labels, examples, row)
        if feedback is None:
            log.warning("round %d: no valid feedback: LLM unchanged, no synthetic data kept",
                        round_)
            return [], excluded
        keep = keep_mask(feedback, cfg.crosslm_threshold)
        weights = example_weights(feedback, cfg.crosslm_weighting)
        self.model, llm_loss = update_llm(self.model, self.tok, examples, weights,
                                          LLMUpdateConfig(steps=cfg.llm_steps,
                                                          learning_rate=cfg.llm_learning_rate,
                                                          seed=cfg.seed * 1009 + round_,
                                                          subject=self.subject))
        row.update(summarise(feedback, keep).to_dict())
        row["llm_train_loss"] = llm_loss
        with synthetic_file.open("a", encoding="utf-8") as f:
            for e, s, k in zip(examples, feedback, keep, strict=True):
                f.write(json.dumps({"round": round_, "text": e.text, "label": e.label,
                                    "score": float(s), "kept": bool(k)}) + "\n")
        return [e for e, k in zip(examples, keep, strict=True) if k], excluded


def _feedback(grid: Grid, cfg: RunConfig, silos: dict[str, Silo], round_: int,
              labels: list[str], examples: list[SyntheticExample], row: dict[str, Any]
              ) -> tuple[np.ndarray | None, list[dict[str, str]]]:
    """Ask every silo to score `examples`; aggregate the valid replies. Adds the bytes
    sent (request JSON) and received (8 bytes a score) to `row`."""
    request = [[e.text, e.label] for e in examples]
    row["bytes_down"] += len(json.dumps(request).encode()) * len(silos)
    ask = ScoreRequest(round=round_, slm=cfg.slm, labels=labels, synthetic=request,
                       private_run=cfg.private, run_seed=cfg.seed)
    replies, excluded = broadcast(grid, silos, ask, cfg.round_timeout)
    scores: dict[str, list[float]] = {}
    counts: dict[str, int | None] = {}
    for silo, reply in replies.items():
        try:
            scores[silo], counts[silo] = validate_feedback(reply, len(examples), cfg.private)
            row["bytes_up"] += 8 * len(scores[silo])
        except (FeedbackRefusedError, ValueError) as err:
            excluded.append({"silo": silo, "reason": f"feedback refused: {err}"})
    if not scores:
        return None, excluded
    weights = aggregation_weights(counts, registry.from_environment())
    return aggregate_feedback(scores, weights), excluded


def _train_slms(grid: Grid, cfg: RunConfig, silos: dict[str, Silo], round_: int,
                labels: list[str], kept: list[SyntheticExample], epsilon: dict[str, float],
                limits: dict[str, float], row: dict[str, Any]
                ) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Every silo trains its SLM (kept synthetic set + private data); held-out accuracy.
    Updates `epsilon` and `limits` per silo and the bytes sent in `row`."""
    synthetic = [[e.text, e.label] for e in kept]
    row["bytes_down"] += len(json.dumps(synthetic).encode()) * len(silos)
    ask = SlmTrainRequest(
        round=round_, slm=cfg.slm, labels=labels, synthetic=synthetic,
        slm_steps=cfg.slm_steps, batch_size=cfg.batch_size,
        learning_rate=cfg.slm_learning_rate, max_grad_norm=cfg.max_grad_norm,
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
        planned_rounds=cfg.rounds + 1, run_seed=cfg.seed)
    replies, excluded = broadcast(grid, silos, ask, cfg.round_timeout)
    accuracy: dict[str, float] = {}
    for silo, reply in replies.items():
        try:
            answer = SlmTrainReply.from_message(reply)
        except MessageError as err:
            excluded.append({"silo": silo, "reason": f"bad SLM training reply: {err}"})
            continue
        accuracy[silo] = answer.slm_accuracy
        if answer.epsilon is not None and answer.epsilon_limit is not None:
            epsilon[silo], limits[silo] = answer.epsilon, answer.epsilon_limit
    return dict(sorted(accuracy.items())), excluded


def format_crosslm_table(metrics: dict[str, Any]) -> str:
    """Plain-text summary of a CrossLM run: one row per round (0 = private data only)."""
    header = ["round", "LLM acc", "LLM ppl", "SLM acc mean", "kept/size", "mean score",
              "eps max", "seconds"]
    rows = [header, ["base", f"{metrics['base_accuracy']:.3f}",
                     f"{metrics['base_perplexity']:.2f}", "-", "-", "-", "-", "-"]]
    for r in metrics["rounds"]:
        eps = list(r["epsilon"].values())
        rows.append([str(r["round"]), f"{r['accuracy']:.3f}", f"{r['perplexity']:.2f}",
                     f"{r['slm_accuracy_mean']:.3f}",
                     f"{r.get('synthetic_kept', 0)}/{r.get('synthetic_size', 0)}",
                     f"{r.get('mean_score', 0.0):.3f}", f"{max(eps):.3f}" if eps else "-",
                     f"{r['seconds']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    last = metrics["rounds"][-1]["slm_accuracy"] if metrics["rounds"] else {}
    lines.append("final SLM accuracy per silo: "
                 + ", ".join(f"{s} {a:.3f}" for s, a in sorted(last.items())))
    return "\n".join(lines)
