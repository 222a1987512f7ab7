"""Run records, replay differences, sweep reports and pictures."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.records.pictures import save_plan_picture
    from glmdeploy.records.record import RecordWriter, RunRecord, read_record
    from glmdeploy.records.replay import differences
    from glmdeploy.records.report import write_report

__all__ = [
    "RecordWriter",
    "RunRecord",
    "differences",
    "read_record",
    "save_plan_picture",
    "write_report",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "RecordWriter": "record",
        "RunRecord": "record",
        "differences": "replay",
        "read_record": "record",
        "save_plan_picture": "pictures",
        "write_report": "report",
    },
)
