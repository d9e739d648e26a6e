"""CLI arguments are validated while parsing, before any work starts: a bad value exits with status 2 and a message
naming the argument, the value and what is expected."""

from __future__ import annotations

import pytest

from moekit.cli import main

BAD = [
    (["demo", "--steps", "0"], "--steps", "expected an integer >= 1, got 0"),
    (["demo", "--steps", "-3"], "--steps", "expected an integer >= 1, got -3"),
    (["demo", "--threads", "0"], "--threads", ">= 1, got 0"),
    (["demo", "--jobs", "0"], "--jobs", ">= 1, got 0"),
    (["compare", "--steps", "0"], "--steps", ">= 1, got 0"),
    (["compare", "--digits-steps", "-1"], "--digits-steps", ">= 1, got -1"),
    (["compare", "--threads", "0"], "--threads", ">= 1, got 0"),
    (["bench", "--repeats", "0"], "--repeats", ">= 1, got 0"),
    (["bench", "--repeats", "-2"], "--repeats", ">= 1, got -2"),
    (["bench", "--runs", "0"], "--runs", ">= 1, got 0"),
    (["bench", "--threads", "0"], "--threads", ">= 1, got 0"),
    (["bench", "--repeats", "two"], "--repeats", "expected an integer, got 'two'"),
    (["train-ep", "--steps", "0"], "--steps", ">= 1, got 0"),
    (["train-ep", "--steps", "-5"], "--steps", ">= 1, got -5"),
    (["train-ep", "--timeout", "0"], "--timeout", "expected a finite number > 0"),
    (["train-ep", "--log-every", "0"], "--log-every", ">= 1, got 0"),
    (["robustqa", "--steps", "0"], "--steps", ">= 1, got 0"),
    (["robustqa", "--threads", "-1"], "--threads", ">= 0, got -1"),
]


@pytest.mark.parametrize("argv,flag,message", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_numbers_exit_before_any_work(argv, flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err, err


def test_out_paths_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "folder"
    a_dir.mkdir()
    cases = [
        (["demo", "--out", str(a_file)], "--out", "is an existing file; expected a folder"),
        (["compare", "--out", str(a_file)], "--out", "is an existing file; expected a folder"),
        (["train-ep", "--save", str(a_file)], "--save", "is an existing file; expected a folder"),
        (["bench", "--out", str(a_dir)], "--out", "is an existing directory; expected a file name"),
        (["robustqa", "--out", str(a_dir)], "--out", "is an existing directory; expected a file name"),
        (["bench", "--out", str(a_file / "x.jsonl")], "--out", "is a file, not a directory"),
        (["train-ep", "--load", str(tmp_path / "missing")], "--load", "is not an existing folder"),
    ]
    for argv, flag, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"]  # nothing was created


def test_good_values_parse():
    from moekit.cli import build_parser

    args = build_parser().parse_args(["bench", "--repeats", "1", "--threads", "2", "--out", "new/rows.jsonl"])
    assert (args.repeats, args.threads, args.out) == (1, 2, "new/rows.jsonl")
    args = build_parser().parse_args(["demo", "--steps", "3", "--out", "new-report"])
    assert (args.steps, args.out) == (3, "new-report")
    assert build_parser().parse_args(["robustqa", "--threads", "0"]).threads == 0  # 0 = torch default
