"""`show1 promote`: move the alias `champion` to the challenger only when its evaluation passes the gate.

Evaluation metrics live on the model version as tags `eval.<metric>` (written by `record_evaluation`, which
`show1 evaluate` calls). The gate is `registry.gate` in params.yaml. Every decision, either way, is recorded
on the challenger as `promotion.*` tags, so the registry UI shows why a version is or is not the champion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from show1.config import GateRule, Params
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

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.name, "challenger": self.challenger, "champion": self.champion,
                "promoted": self.promoted, "reason": self.reason}


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


def promote_stage(params: Params, stage: str, dry_run: bool = False) -> Decision:
    """Decide, record the decision on the challenger, and (unless `dry_run`) move `champion` when it passes."""
    from mlflow.exceptions import MlflowException

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
                        promoted=passed, reasons=reasons)
    if dry_run:
        return decision
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {"promotion.decision": "promoted" if passed else "rejected",
                       "promotion.reason": decision.reason[:5000],
                       "promotion.compared_to": decision.champion or "none", "promotion.time": stamp}.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    if passed:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "promotion.replaced_by", challenger.version)
    return decision
