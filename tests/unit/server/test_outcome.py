"""How a run ended (silotune/server/outcome.py): the best round, and the warning with its
likely causes when a run ends below its base or falls while its loss falls."""

from __future__ import annotations

from silotune.ml.lm import colliding_labels, load_model
from silotune.server.outcome import TaskFacts, best_round, warnings
from silotune.server.report import format_summary_table

CLEAN = TaskFacts(truncated_share=0.0, colliding_labels=(), majority_share=0.34)


def _metrics(base: float, rounds: list[tuple[float, float]]) -> dict:
    return {"config": {"strategy": "flora", "target_epsilon": 8.0, "target_delta": 1e-5,
                       "learning_rate": 0.01},
            "private": True, "base_accuracy": base, "base_loss": 9.0,
            "rounds": [{"round": i, "accuracy": a, "loss": loss, "epsilon": {},
                        "epsilon_limit": {}, "noise_multiplier": {"a": 0.5},
                        "bytes_up": 1, "bytes_down": 1, "seconds": 1.0, "excluded": [],
                        "merged_updates": i}
                       for i, (a, loss) in enumerate(rounds, start=1)]}


def test_the_best_round_is_the_most_accurate_with_ties_to_the_lower_loss():
    m = _metrics(0.33, [(0.34, 8.0), (0.40, 6.0), (0.40, 5.0), (0.23, 2.5)])
    assert best_round(m) == {"round": 3, "accuracy": 0.40, "loss": 5.0, "merged_updates": 3}
    assert best_round(_metrics(0.5, [(0.4, 3.0), (0.5, 9.0)]))["round"] == 0  # base


def test_a_run_that_ends_below_its_base_is_told_so_with_the_causes_it_can_check():
    # the issue's own numbers: 0.330 -> 0.342, 0.306, 0.233, 0.267 while loss 10.3 -> 2.5
    m = _metrics(0.330, [(0.342, 6.0), (0.306, 4.0), (0.233, 3.0), (0.267, 2.5)])
    facts = TaskFacts(truncated_share=0.4, colliding_labels=("heart", "heart lung"),
                      majority_share=0.6)
    notes = warnings(m, facts)
    assert notes[0].startswith("the run ended BELOW its base model: held-out accuracy 0.267")
    assert any("fell two rounds in a row (to round 3)" in n for n in notes)
    assert any("best model is round 1" in n for n in notes)
    causes = [n for n in notes if n.startswith("likely cause")]
    assert len(causes) == 4 and "40% of held-out prompts" in causes[0]
    assert "heart, heart lung" in causes[1] and "60%" in causes[2]
    assert "learning rate 0.01" in causes[3]


def test_a_run_that_improves_gets_no_warning_and_its_best_round_is_marked():
    m = _metrics(0.33, [(0.40, 6.0), (0.45, 5.0)])
    assert warnings(m, CLEAN) == []
    m["best_round"] = best_round(m)
    table = format_summary_table(m)
    assert "best: round 2 (marked *)" in table and "\n2*" in table
    assert "WARNING" not in table


def test_labels_whose_tokens_start_another_label_collide(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    assert colliding_labels(tok, ["heart", "lung", "skin"]) == ()
    assert colliding_labels(tok, ["heart", "heart lung", "skin"]) == ("heart",)
