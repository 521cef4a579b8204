"""How a run ended: the best round, and a loud warning when it did worse than its base.

A federation can end below the model it started from while its held-out loss keeps
falling (docs/algorithms.md, "Never worse than the base"): the final round is then the
wrong model to ship. The coordinator therefore tracks the held-out accuracy of every
round, keeps the best one (the base counts as round 0: a run that never beat its base
says so), and at the end warns when the run finished below its base, or when accuracy
fell two rounds in a row while the loss fell, naming the causes the run can check
itself from public facts: prompts cut at the length cap, labels that share their first
tokens, label imbalance of the held-out split, and the noise multiplier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def best_round(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The round with the highest held-out accuracy (ties: lower loss, then earlier);
    round 0 is the base model. ``{"round", "accuracy", "loss", "merged_updates"}``."""
    best = {"round": 0, "accuracy": metrics["base_accuracy"], "loss": metrics["base_loss"],
            "merged_updates": 0}
    for row in metrics["rounds"]:
        if (row["accuracy"], -row["loss"]) > (best["accuracy"], -best["loss"]):
            best = {"round": row["round"], "accuracy": row["accuracy"], "loss": row["loss"],
                    "merged_updates": row.get("merged_updates", 0)}
    return best


@dataclass(frozen=True)
class TaskFacts:
    """Public facts about the task that explain a fall in accuracy."""

    truncated_share: float  # of held-out prompts cut at the length cap
    colliding_labels: tuple[str, ...]  # labels whose scored tokens start another's
    majority_share: float  # of the held-out split's most common label


def warnings(metrics: Mapping[str, Any], facts: TaskFacts) -> list[str]:
    """What a user must be told about how the run ended (empty when nothing is wrong)."""
    rounds: Sequence[Mapping[str, Any]] = metrics["rounds"]
    if not rounds:
        return []
    out = []
    base, last = metrics["base_accuracy"], rounds[-1]
    if last["accuracy"] < base:
        out.append(f"the run ended BELOW its base model: held-out accuracy "
                   f"{last['accuracy']:.3f} after round {last['round']} against "
                   f"{base:.3f} before training")
    falls = [i for i in range(2, len(rounds))
             if rounds[i]["accuracy"] < rounds[i - 1]["accuracy"] < rounds[i - 2]["accuracy"]
             and rounds[i]["loss"] < rounds[i - 1]["loss"] < rounds[i - 2]["loss"]]
    if falls:
        r = rounds[falls[-1]]["round"]
        out.append(f"held-out accuracy fell two rounds in a row (to round {r}) while the loss "
                   "fell: the model is learning the answers' form more than the choice")
    if not out:
        return []
    best = best_round(metrics)
    keep = ("the base model is the best: nothing trained here beats it"
            if best["round"] == 0 else
            f"the best model is round {best['round']} (accuracy {best['accuracy']:.3f}), "
            "kept as metrics.json best_round")
    return [*out, keep, *likely_causes(metrics, facts)]


def likely_causes(metrics: Mapping[str, Any], facts: TaskFacts) -> list[str]:
    """Checks the run can make itself, each with the fix to try."""
    causes = []
    if facts.truncated_share > 0:
        causes.append(f"{facts.truncated_share:.0%} of held-out prompts are cut at the "
                      "length cap: the text a label depends on may be lost")
    if facts.colliding_labels:
        causes.append(f"labels {', '.join(facts.colliding_labels)} share their first tokens: "
                      "scoring then rests on the end-of-answer token; rename them apart")
    if facts.majority_share >= 0.5:
        causes.append(f"one label holds {facts.majority_share:.0%} of the held-out split: "
                      "accuracy rewards predicting it")
    sigmas = [s for r in metrics["rounds"] for s in r.get("noise_multiplier", {}).values()]
    if sigmas and max(sigmas) >= 1.0:
        causes.append(f"DP noise multiplier up to {max(sigmas):.2f}: raise the batch size or "
                      "epsilon, or train fewer steps")
    lr = metrics.get("config", {}).get("learning_rate")
    if lr is not None:
        causes.append(f"learning rate {lr:g}: try a smaller one (--learning-rate)")
    return [f"likely cause: {c}" for c in causes]
