"""Writing what ``backout harden`` found: events, regression test, policies, summary. [adapter:
files]

The run's events go to an Avro object container file (fastavro, the ActionEvent schema);
the test module comes from :mod:`backout.infra.harden_template`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import fastavro

from backout.infra.harden import Proposal
from backout.infra.harden_template import render_test_module
from backout.infra.policy_edit import unified_diff
from backout.schemas.codec import current_schema, from_datum, to_datum
from backout.schemas.errors import ConfigError
from backout.schemas.events import ActionEvent

__all__ = ["HardenResult", "read_events", "safe_name", "write_events", "write_outputs"]


def write_events(
    path: Path, events: Sequence[ActionEvent], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``events`` as an Avro object container file with the ActionEvent schema."""
    schema = current_schema(ActionEvent).parsed
    with path.open("wb") as out:
        fastavro.writer(
            out,
            schema,
            [to_datum(e) for e in events],
            codec="deflate",
            metadata=dict(metadata or {}),
        )


def read_events(path: Path) -> list[ActionEvent]:
    """The ActionEvents of an Avro object container file (read with the current schema).

    Raises:
        ConfigError: not readable, or not an Avro container of ActionEvents.
    """
    try:
        with path.open("rb") as src:
            reader = fastavro.reader(src, reader_schema=current_schema(ActionEvent).parsed)
            return [from_datum(ActionEvent, cast(dict[str, Any], d)) for d in reader]
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # fastavro raises many types for foreign files
        raise ConfigError(f"{str(path)!r} is not an Avro file of ActionEvents: {exc}") from None


@dataclass(frozen=True)
class HardenResult:
    """A proposal and the files written for it."""

    proposal: Proposal
    policy_path: Path
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        p = self.proposal
        return {
            "run": p.run_id,
            "events": len(p.events),
            "policy": str(self.policy_path),
            "contained_before": p.old.to_dict() if p.old else None,
            "proposed_by": p.proposed_by,
            "change": p.change.to_dict() if p.change else None,
            "contained_after": p.proposed.to_dict() if p.proposed else None,
            "test_asserts_containment_by_event": p.contained_by,
            "rejected": [{"change": c.describe(), "froze_baseline": why} for c, why in p.rejected],
            "permissions": [x.to_dict() for x in p.permissions],
            "contained_with_permission": (
                p.with_permission.to_dict() if p.with_permission else None
            ),
            "baseline": {"runs": list(p.baseline_runs), "events": p.baseline_events},
            "files": {k: str(v) for k, v in self.files.items()},
            "notes": list(p.notes),
        }


def _change_text(proposal: Proposal) -> str:
    if proposal.change is not None and proposal.proposed_by == "limits":
        return proposal.change.describe()
    if proposal.proposed_by == "permission":
        return "the narrower permission: " + "; ".join(
            f"{'.'.join(k)}: {v}" for p in proposal.permissions for k, v in p.paths().items()
        )
    return "none (this test guards the containment of the policy in force)"


def safe_name(run_id: str) -> str:
    """A file and module name fragment for a run id."""
    return re.sub(r"[^A-Za-z0-9_]", "_", run_id) or "run"


def write_outputs(
    proposal: Proposal, out: Path, *, policy_path: Path, generated_at: datetime
) -> HardenResult:
    """Write the events, the test, the policies and diffs, and ``harden.json`` into ``out``.

    Raises:
        ConfigError: ``out`` cannot be created or written.
    """
    name = safe_name(proposal.run_id)
    files = {
        "events": out / f"{name}.avro",
        "proposed_policy": out / "policy.proposed.yaml",
        "policy_diff": out / "policy.diff",
        "permission_diff": out / "permission.diff",
        "summary": out / "harden.json",
    }
    if proposal.contained_by is not None:
        files["test"] = out / f"test_harden_{name}.py"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_events(
            files["events"],
            proposal.events,
            metadata={
                "backout.run": proposal.run_id,
                "backout.generated_by": "backout harden",
                "backout.generated_at": generated_at.isoformat(),
            },
        )
        files["proposed_policy"].write_text(proposal.proposed_text, "utf-8")
        diff_name = policy_path.name
        files["policy_diff"].write_text(
            unified_diff(proposal.policy_text, proposal.proposed_text, name=diff_name), "utf-8"
        )
        files["permission_diff"].write_text(
            unified_diff(proposal.proposed_text, proposal.permission_text, name=diff_name), "utf-8"
        )
        if "test" in files:
            files["test"].write_text(
                render_test_module(
                    run_id=proposal.run_id,
                    events_file=files["events"].name,
                    events=len(proposal.events),
                    policy_path=policy_path.resolve(),
                    contained_by=proposal.contained_by or 0,
                    was=proposal.old.index if proposal.old else None,
                    change=_change_text(proposal),
                    generated_at=generated_at,
                ),
                "utf-8",
            )
        result = HardenResult(proposal, policy_path, files)
        files["summary"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write into {str(out)!r}: {exc.strerror or exc}") from None
    return result
