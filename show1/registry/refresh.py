"""The continuous-training loop's registry side (flows/refresh.py orchestrates it): which champion each stage
fine-tunes from, where a refresh writes, and the challenger-vs-champion table it leaves on the Prefect server.

A refresh is named by the data version it was triggered for (`show1 ingest` emits it in its event); its run folders
(`paths.runs/refresh/<data version>/<stage>`) and evaluations (`evaluate.out/refresh-<data version>/`) are keyed
by it, so a retried flow run resumes its trainings instead of starting new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from show1.config import Params
from show1.registry.names import CHALLENGER, CHAMPION, model_name
from show1.registry.promote import evaluation_metrics
from show1.registry.resolve import RegistryLookupError, model_version
from show1.store import connect

SHORT = 12  # characters of the data version in folder and flow-run names


class NoChampion(RegistryLookupError):
    """A stage to refresh has no champion to fine-tune from."""


@dataclass(frozen=True)
class StartingPoint:
    stage: str
    name: str
    version: str
    content_hash: str

    @property
    def uri(self) -> str:
        """The pinned version (not `@champion`): what the fine-tuning starts from even if the alias moves."""
        return f"models:/{self.name}/{self.version}"


def champions(params: Params, stages: list[str]) -> dict[str, StartingPoint]:
    """Each stage's champion version, or NoChampion naming every stage without one (nothing is trained then)."""
    client = connect(params.tracking)
    found, missing = {}, []
    for stage in stages:
        name = model_name(params.registry, stage)
        try:
            info = model_version(client, name, CHAMPION)
        except RegistryLookupError:
            missing.append(name)
            continue
        found[stage] = StartingPoint(stage, name, str(info.version), info.tags.get("content_hash", ""))
    if missing:
        raise NoChampion(f"no champion to fine-tune for {', '.join(missing)}: a refresh fine-tunes the model in "
                         "production; promote one first (show1 run, or show1 evaluate then show1 promote)")
    return found


def short_version(data_version: str) -> str:
    return data_version.removeprefix("sha256:")[:SHORT]


def run_folder(params: Params, data_version: str) -> Path:
    return params.paths.runs / "refresh" / short_version(data_version)


def evaluation_folder(params: Params, data_version: str, alias: str) -> Path:
    return Path(params.evaluate.out) / f"refresh-{short_version(data_version)}" / alias


def challenger_reference(stages: list[str]) -> str:
    """`--from-registry` for the challenger cascade: the refreshed stages' challengers, the champion elsewhere."""
    return ",".join(f"{stage}={CHALLENGER}" for stage in stages)


@dataclass(frozen=True)
class Comparison:
    stage: str
    model: str
    challenger: str
    champion: str | None
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    decision: str
    reason: str


def compare(params: Params, decisions: list[dict[str, Any]]) -> list[Comparison]:
    """One row per promotion decision, with both versions' evaluation metrics as the registry holds them."""
    client = connect(params.tracking)
    rows = []
    for decision in decisions:
        name = decision["model"]
        challenger = client.get_model_version(name, decision["challenger"])
        champion = client.get_model_version(name, decision["champion"]) if decision["champion"] else None
        rows.append(Comparison(decision["stage"], name, decision["challenger"], decision["champion"],
                               evaluation_metrics(challenger), evaluation_metrics(champion) if champion else {},
                               decision["decision"], decision["reason"]))
    return rows


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.5g}"


def markdown(data_version: str, rows: list[Comparison], gate_metrics: list[str]) -> str:
    """The Prefect artifact: challenger vs champion per stage and metric, the decision and its reason."""
    metrics = list(dict.fromkeys([*gate_metrics, *(m for r in rows for m in sorted(r.challenger_metrics))]))
    lines = [f"## Refresh for data version `{short_version(data_version)}`", "",
             "| stage | challenger | champion | " + " | ".join(f"{m} (challenger / champion)" for m in metrics)
             + " | decision | reason |",
             "|" + "---|" * (5 + len(metrics))]
    for row in rows:
        cells = [f"{_number(row.challenger_metrics.get(m))} / {_number(row.champion_metrics.get(m))}"
                 for m in metrics]
        reason = row.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row.stage} | {row.model}/{row.challenger} | "
                     f"{f'{row.model}/{row.champion}' if row.champion else 'none'} | " + " | ".join(cells)
                     + f" | **{row.decision}** | {reason} |")
    lines += ["", f"Gate: `registry.gate` in params.yaml ({', '.join(gate_metrics)}). Every decision is also recorded "
              "on the challenger version as `promotion.*` tags (MLflow UI → Models → the version)."]
    return "\n".join(lines)
