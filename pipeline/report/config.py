"""The report stage's config."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configbase import require


@dataclass
class ReportStageConfig:
    out_dir: str = "outputs/report"
    title: str = "MobileMoE recipe report"
    # Where the MLflow UI is served (`make ui`): the report links every stage's run there.
    ui_url: str = "http://127.0.0.1:5000"
    # The scaling tools' outputs (make scaling-fit, make plan, make closed-loop) and the
    # plan the report shows (scaling_dir/plan/<scaling_plan>/plan.json).
    scaling_dir: str = "outputs/scaling"
    scaling_plan: str = "planned_tiny"

    def __post_init__(self) -> None:
        require(bool(self.out_dir), "out_dir", "must be a non-empty path")
        require(bool(self.scaling_dir), "scaling_dir", "must be a non-empty path")
        require(bool(self.scaling_plan), "scaling_plan", "must name a plan (outputs/scaling/plan/<name>)")
        require(
            self.ui_url.startswith(("http://", "https://")), "ui_url", f"must be an http(s) URL, got {self.ui_url!r}"
        )
