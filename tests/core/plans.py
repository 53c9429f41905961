"""Reading query plans (``explain()``) in tests: which stages ran, which indexes were scanned."""

from __future__ import annotations

from typing import Any


def stages(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage of a (winning) plan, outermost first."""
    out = [plan]
    for key in ("inputStage", "queryPlan"):
        if key in plan:
            out += stages(plan[key])
    for child in plan.get("inputStages", []):
        out += stages(child)
    return out


async def scans(cursor: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The IXSCAN stages of ``cursor``'s winning plan and the names of every stage; fails
    when the plan scans the collection."""
    plan = (await cursor.explain())["queryPlanner"]["winningPlan"]
    found = stages(plan)
    names = [s.get("stage") for s in found]
    assert "COLLSCAN" not in names, plan
    return [s for s in found if s.get("stage") == "IXSCAN"], names
