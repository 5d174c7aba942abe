"""Admin views of ranking quality: a batch's agreement (API and page) and the held-out labelers.

Before a batch's rankings train the reward model, admins check here how far
labelers agree (`app.services.quality`), which labelers to look at (too fast,
far below the batch's agreement, ranking by display order), and mark
labelers held out so the RM's accuracy on people it never learned from can
be measured. The API answers admins (session with X-CSRF-Token, or an
`admin`-scope token); the pages are for signed-in admins, with CSRF-protected
forms and SVG drawn on the server so the CSP stays strict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse

from app.deps import AdminApi, AdminPage, SessionDep
from app.routes.batches_api import get_batch_or_404
from app.routes.pages import render
from app.services import quality
from app.services.quality import DailyAgreement

router = APIRouter()
api_router = APIRouter(prefix="/api/v1", tags=["quality"])
pages_router = APIRouter(include_in_schema=False)

Ties = Annotated[
    Literal["exclude", "disagree", "half"],
    Query(description="Pairs tied by a labeler: left out (default, as InstructGPT), counted as disagreement, "
                      "or as half an agreement."),
]

CHART_WIDTH, CHART_HEIGHT = 640, 160


def agreement_chart(days: list[DailyAgreement]) -> dict[str, Any]:
    """Places daily pairwise agreement on a 0..100 % SVG chart: a polyline and one dot per day."""
    points = [(d.day, d.pairwise) for d in days if d.pairwise is not None]
    if not points:
        return {}
    step = CHART_WIDTH / (len(points) - 1) if len(points) > 1 else 0
    dots = [{"x": round(i * step if step else CHART_WIDTH / 2, 1), "y": round(CHART_HEIGHT * (1 - value), 1),
             "label": f"{day.isoformat()}: {value * 100:.1f} %"} for i, (day, value) in enumerate(points)]
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "dots": dots,
            "points": " ".join(f"{d['x']},{d['y']}" for d in dots),
            "first": points[0][0].isoformat(), "last": points[-1][0].isoformat()}


@api_router.get("/batches/{batch_id}/agreement")
def batch_agreement_api(batch_id: int, db: SessionDep, principal: AdminApi, ties: Ties = "exclude") -> dict:
    """Agreement of a batch's overlapping rankings: pairwise, tau-b, ordinal alpha, per labeler, by day, warnings."""
    get_batch_or_404(db, batch_id)
    return quality.quality_report(db, batch_id, ties).as_dict()


@pages_router.get("/admin/batches/{batch_id}/quality")
def batch_quality_page(batch_id: int, request: Request, principal: AdminPage, db: SessionDep,
                       ties: Ties = "exclude"):
    """Shows a batch's agreement, agreement over time, per-labeler table and warnings."""
    batch = get_batch_or_404(db, batch_id)
    report = quality.quality_report(db, batch_id, ties)
    return render(request, "admin/quality.html", principal, batch=batch, report=report,
                  chart=agreement_chart(report.over_time))


@pages_router.get("/admin/labelers")
def labelers_page(request: Request, principal: AdminPage, db: SessionDep):
    """Lists labelers with their held-out status and agreement over all batches."""
    return render(request, "admin/labelers.html", principal, labelers=quality.labelers_overview(db))


@pages_router.post("/admin/labelers/{labeler_id}/held-out")
def labeler_held_out(labeler_id: int, principal: AdminPage, db: SessionDep,
                     held_out: Annotated[Literal["true", "false"] | None, Form()] = None):
    """Marks a labeler held out (rankings go to validation only) or back; toggles when `held_out` is absent."""
    user = quality.set_held_out(db, labeler_id, None if held_out is None else held_out == "true")
    if user is None:
        raise HTTPException(404, f"No labeler {labeler_id}")
    return RedirectResponse("/admin/labelers", status_code=303)


router.include_router(api_router)
router.include_router(pages_router)
