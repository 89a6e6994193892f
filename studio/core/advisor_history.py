"""A shaping run's history as JSON, for test data and bug reports: the evidence the advisor judges
(metrics, eval outputs per checkpoint, labels against earlier states, reward sources, base samples),
without the model. :func:`evidence_from_history` replays it through :func:`advisor.advise`.

    python -m studio.core.advisor_history PROJECT RUN_ID OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from . import advisor, store
from .advisor_stats import Estimate

FORMAT = "alignment-studio/advisor-history/1"


def export_history(db, run_id: int) -> dict:
    """The run's evidence as plain JSON-able data."""
    evidence = advisor.gather(db, run_id)
    run = evidence.run
    data = dataclasses.asdict(run)
    for checkpoint in data["checkpoints"]:
        checkpoint["outputs"] = {str(p): text for p, text in checkpoint["outputs"].items()}
    data["start_outputs"] = {str(p): text for p, text in run.start_outputs.items()}
    return {"format": FORMAT, "risk_tolerance": evidence.risk_tolerance,
            "reward_scale": evidence.reward_scale, "rules_checked": evidence.rules_checked,
            "base_samples": [dataclasses.asdict(s) for s in evidence.base_samples],
            "labelled_pairs": evidence.labelled_pairs, "imported_pairs": evidence.imported_pairs, "run": data}


def evidence_from_history(data: dict) -> advisor.Evidence:
    """The Evidence an exported history holds; ValueError naming the field when it is not one."""
    if data.get("format") != FORMAT:
        raise ValueError(f"not an advisor history: format is {data.get('format')!r}, expected {FORMAT!r}")
    run = dict(data["run"])
    checkpoints = []
    for index, checkpoint in enumerate(run.pop("checkpoints")):
        quality = checkpoint.pop("quality", None)
        outputs = {int(p): text for p, text in checkpoint.pop("outputs").items()}
        try:
            checkpoints.append(advisor.CheckpointEvidence(outputs=outputs, quality=Estimate(**quality) if quality else None,
                                                          **checkpoint))
        except TypeError as exc:
            raise ValueError(f"run.checkpoints[{index}]: {exc}") from None
    run["start_outputs"] = {int(p): text for p, text in run["start_outputs"].items()}
    for name in ("reward", "kl", "entropy", "length"):
        run[name] = tuple(run[name])
    for name in ("settling_run",):
        run[name] = tuple(run[name]) if run.get(name) else None
    return advisor.Evidence(
        risk_tolerance=data["risk_tolerance"], reward_scale=data["reward_scale"],
        rules_checked=data["rules_checked"], base_samples=[advisor.BaseSample(**s) for s in data["base_samples"]],
        labelled_pairs=data["labelled_pairs"], imported_pairs=data["imported_pairs"],
        run=advisor.RunEvidence(checkpoints=checkpoints, **run))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    project, run_id, out = argv
    db = store.connect(project)
    try:
        data = export_history(db, int(run_id))
    finally:
        db.close()
    partial = Path(out).with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(out)  # never a half-written history
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
