"""Old home of the margin schedule, kept so that configs naming ``mlearn.margin_schedule.MarginScheduler``
keep working; the code lives in :mod:`mlearn.schedules`."""
from mlearn.schedules import MarginScheduler, margin_at

__all__ = ["MarginScheduler", "margin_at"]
