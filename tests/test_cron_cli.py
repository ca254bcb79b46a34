"""`jobworker cron preview`: one fire instant a line, its first field ISO 8601 with the offset."""

from __future__ import annotations

import pytest

from app.cli import main


def preview(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    code = main(["cron", "preview", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_preview_marks_a_time_dst_moved(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = preview(
        capsys, "30 2 * * *", "--tz", "America/New_York", "-n", "3", "--after", "2026-03-07"
    )
    assert code == 0
    assert lines == [
        "2026-03-07T02:30:00-05:00  2026-03-07T07:30:00Z",
        "2026-03-08T03:00:00-04:00  2026-03-08T07:00:00Z"
        "  moved (DST): 2026-03-08T02:30:00 does not exist",
        "2026-03-09T02:30:00-04:00  2026-03-09T06:30:00Z",
    ]  # fmt: skip


def test_preview_policies_and_six_fields(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tz", "America/New_York", "--after", "2026-11-01T00:59:59-04:00", "-n", "3"]
    _, once, _ = preview(capsys, "0 30 1 * * *", *args)
    assert [line.split()[0] for line in once] == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
        "2026-11-03T01:30:00-05:00",
    ]
    _, twice, _ = preview(capsys, "0 30 1 * * *", *args, "--repeated", "twice")
    assert twice[1] == (
        "2026-11-01T01:30:00-05:00  2026-11-01T06:30:00Z"
        "  repeated (DST): second 2026-11-01T01:30:00"
    )
    _, skip, _ = preview(
        capsys, "30 2 * * *", "--tz", "America/New_York", "--after", "2026-03-07T12:00",
        "-n", "1", "--skipped", "skip",
    )  # fmt: skip
    assert skip == ["2026-03-09T02:30:00-04:00  2026-03-09T06:30:00Z"]


def test_preview_defaults_to_ten_lines_after_now(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = preview(capsys, "@hourly")
    assert code == 0
    assert len(lines) == 10
    assert all(line.split()[0].endswith(":00:00+00:00") for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0 0 32 * *"], "EXPR: '0 0 32 * *': day-of-month (field 3 of 5) '32': 32 is not in 1-31"),
        (["@daily", "--tz", "Mars/Olympus"], "--tz: unknown time zone 'Mars/Olympus'"),
        (["@daily", "--after", "tomorrow"], "--after: expected ISO 8601, got 'tomorrow'"),
        (["@daily", "-n", "0"], "-n: must be at least 1, got 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, lines, err = preview(capsys, *args)
    assert code == 2
    assert lines == []
    (line,) = err.splitlines()
    assert line.startswith(f"jobworker: config error: {message}")
