"""`show1 promote`: move the alias `champion` to the challenger only when its evaluation passes the gate.

Evaluation metrics live on the model version as tags `eval.<metric>` (written by `record_evaluation`, which
`show1 evaluate` calls). The gate is `registry.gate` in params.yaml. Every decision, either way, is recorded
on the challenger as `promotion.*` tags, so the registry UI shows why a version is or is not the champion.

An experiment is a question, not a release: inside `dvc exp run` (and wherever the caller asks, `show1 promote
--record-only`) the decision is recorded on the version ("would promote") and no alias moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from show1.config import GateRule, Params, dvc_experiment
from show1.registry.names import CHALLENGER, CHAMPION, model_name
from show1.registry.resolve import model_version
from show1.store import connect

EVAL_PREFIX = "eval."


@dataclass
class Decision:
    stage: str
    name: str
    challenger: str
    champion: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    # Set when the decision was only recorded (a DVC experiment, --record-only): the gate passed or not, but no
    # alias moved; `promoted` is then False.
    record_only: str | None = None
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        """What happened: promoted | rejected | would promote | would reject | unchanged (already champion)."""
        if self.passed is None:
            return "unchanged"
        if self.record_only:
            return "would promote" if self.passed else "would reject"
        return "promoted" if self.promoted else "rejected"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.name, "challenger": self.challenger, "champion": self.champion,
                "promoted": self.promoted, "decision": self.verdict, "record_only": self.record_only,
                "reason": self.reason}

    def metrics(self) -> dict[str, int]:
        """The decision as numbers, for a DVC metrics file (`to_dict` has the versions, verdict and reasons):
        promoted 1/0, and passed 1/0, what an experiment's "would promote" compares (absent when the gate was not
        asked: the challenger is the champion already)."""
        return {"promoted": int(self.promoted)} | ({} if self.passed is None else {"passed": int(self.passed)})


def record_evaluation(client: Any, name: str, version: str, metrics: dict[str, float],
                      run_id: str | None = None) -> None:
    """Put evaluation metrics on a version as `eval.<metric>` tags (and the evaluation run's id)."""
    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"{EVAL_PREFIX}{metric}", repr(float(value)))
    if run_id:
        client.set_model_version_tag(name, version, f"{EVAL_PREFIX}run_id", run_id)


def evaluation_metrics(version: Any) -> dict[str, float]:
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith(EVAL_PREFIX) and key != f"{EVAL_PREFIX}run_id":
            try:
                metrics[key.removeprefix(EVAL_PREFIX)] = float(value)
            except ValueError:
                continue
    return metrics


def check_gate(gate: list[GateRule], challenger: dict[str, float],
               champion: dict[str, float] | None) -> tuple[bool, list[str]]:
    """Every rule must pass; returns (passed, one reason per rule)."""
    passed, reasons = True, []
    for rule in gate:
        better = "higher" if rule.higher_is_better else "lower"
        value = challenger.get(rule.metric)
        if value is None or math.isnan(value):
            passed = False
            reasons.append(f"{rule.metric}: the challenger has no evaluation (run show1 evaluate)")
            continue
        if rule.threshold is not None:
            within = value >= rule.threshold if rule.higher_is_better else value <= rule.threshold
            if not within:
                passed = False
                reasons.append(f"{rule.metric} {value:.6g} misses the threshold {rule.threshold:.6g} "
                               f"({better} is better)")
                continue
        reference = None if champion is None else champion.get(rule.metric)
        if reference is None or math.isnan(reference):
            reasons.append(f"{rule.metric} {value:.6g}: no champion value to beat")
            continue
        improvement = value - reference if rule.higher_is_better else reference - value
        if improvement >= rule.min_improvement:
            reasons.append(f"{rule.metric} {value:.6g} vs champion {reference:.6g}: improvement {improvement:.6g} "
                           f">= {rule.min_improvement:.6g} ({better} is better)")
        else:
            passed = False
            reasons.append(f"{rule.metric} {value:.6g} vs champion {reference:.6g}: improvement {improvement:.6g} "
                           f"< {rule.min_improvement:.6g} ({better} is better)")
    return passed, reasons


def promote_stage(params: Params, stage: str, dry_run: bool = False, record_only: str | None = None) -> Decision:
    """Decide, record the decision on the challenger, and move `champion` when it passes.

    `dry_run`: decide only (nothing recorded). `record_only` (a reason, e.g. "dvc experiment NAME"): record the
    decision but move no alias; inside a DVC experiment that is the default, whatever the caller asks."""
    from mlflow.exceptions import MlflowException

    experiment = dvc_experiment()
    if experiment is not None:
        record_only = f"dvc experiment {experiment}"
    client = connect(params.tracking)
    name = model_name(params.registry, stage)
    challenger = model_version(client, name, CHALLENGER)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(challenger.version):
        return Decision(stage, name, str(challenger.version), str(champion.version), promoted=False,
                        reasons=[f"version {challenger.version} is already the champion"])
    passed, reasons = check_gate(params.registry.gate, evaluation_metrics(challenger),
                                 None if champion is None else evaluation_metrics(champion))
    decision = Decision(stage, name, str(challenger.version), None if champion is None else str(champion.version),
                        promoted=passed and not record_only, reasons=reasons, record_only=record_only, passed=passed)
    if dry_run:
        return decision
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {"promotion.decision": decision.verdict, "promotion.reason": decision.reason[:5000],
            "promotion.compared_to": decision.champion or "none", "promotion.time": stamp}
    if record_only:
        tags["promotion.record_only"] = record_only[:5000]
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "promotion.replaced_by", challenger.version)
    return decision
