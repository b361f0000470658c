"""``exporter report``: a run's tables and pictures (image grid, activation ranges, per-block
parity, speed against quality) gathered into one Markdown file."""

from exporter.report.report import build_report

__all__ = ["build_report"]
