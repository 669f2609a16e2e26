"""The shared progress type and the CLI's text bar."""

from __future__ import annotations

import io

from lora_studio.progress import ProgressEvent, StopFlag, report, text_progress


def test_report_sends_events_only_when_someone_listens():
    seen: list[ProgressEvent] = []
    report(None, "x", 1, 2)  # no listener: nothing happens, nothing fails
    report(seen.append, "train", 3, 10, "step 3", loss=0.5)
    assert seen == [ProgressEvent("train", 3, 10, "step 3", {"loss": 0.5})]
    assert seen[0].fraction == 0.3
    assert ProgressEvent("x", 5, None).fraction is None


def test_text_bar_shows_progress_and_no_rate_before_any_work_was_timed():
    out = io.StringIO()
    bar = text_progress(out, width=10)
    bar(ProgressEvent("train", 0, 4, "start"))
    first = out.getvalue()
    assert "0/4" in first and "-/s" in first            # no made-up rate from a single event
    bar(ProgressEvent("train", 2, 4))
    bar(ProgressEvent("train", 4, 4, "done"))
    lines = out.getvalue().replace("\r", "\n").splitlines()
    assert "[#####.....] 2/4" in lines[1] and "/s eta" in lines[1]
    assert "[##########] 4/4" in lines[2] and out.getvalue().endswith("\n")  # the bar ends its line when done


def test_stop_flag():
    flag = StopFlag()
    assert not flag.requested
    flag.request()
    assert flag.requested
    flag.clear()
    assert not flag.requested
