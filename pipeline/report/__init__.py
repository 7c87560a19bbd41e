"""The recipe's final report: one markdown file and its self-contained HTML twin, built
from the stages' published output files (plain paths and dicts in, files out; no Ray,
MLflow or recipe config here).

    data = collect(ReportInputs(model=..., mixtures=..., train_dirs=..., ...))
    summary = write_report(data, Path("outputs/report"))
"""

from pipeline.report.collect import ReportData, ReportInputError, ReportInputs, collect
from pipeline.report.render import write_report

__all__ = ["ReportData", "ReportInputError", "ReportInputs", "collect", "write_report"]
