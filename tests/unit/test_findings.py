"""A finding's tolerance is smaller than the effect it claims (issue 13, item 7); Table III's configuration."""

from __future__ import annotations


def test_an_accuracy_verdict_needs_a_gap_beyond_the_noise():
    from rocoin.experiments.common import accuracy_verdict

    # 10,000 test images at ~90 %: the standard error of a difference is ~0.42 points, so 2 SE ~0.85.
    assert accuracy_verdict(90.5, 90.0, 10_000).startswith("within noise")
    assert accuracy_verdict(92.0, 90.0, 10_000) == "agrees"
    assert accuracy_verdict(88.0, 90.0, 10_000) == "does not agree"
    # the spread of random failure draws widens the margin
    assert accuracy_verdict(92.0, 90.0, 10_000, a_std_pct=4.0, b_std_pct=4.0, trials=4).startswith("within noise")


def test_a_paired_gap_has_a_standard_error_from_the_spread_of_its_differences():
    from rocoin.experiments.common import paired_gap

    gap, se = paired_gap([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5])
    assert gap == 0.5 and se == 0.0  # the same shift on every fleet: no doubt at all
    gap, se = paired_gap([1.0, 2.0], [3.0, 2.0])
    assert gap == 1.0 and se == 1.0


def test_table3_runs_the_papers_cifar100_family_where_the_files_are(tmp_path):
    from rocoin.experiments.paper import TABLE3_PAPER, TABLE3_SCALED_STUDENTS, table3_setup
    from rocoin.experiments.setup import make_setup

    asked = make_setup("default", dataset="cifar100", data_dir=str(tmp_path))
    setup, note = table3_setup(asked)
    assert "not present" in note and setup.students == TABLE3_SCALED_STUDENTS
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")  # only looked at, not read
    setup, note = table3_setup(asked)
    assert (setup.dataset, setup.teacher_arch, setup.students) == (
        TABLE3_PAPER["dataset"],
        "wrn-28-10",
        ("wrn-16-3", "wrn-16-2", "wrn-22-1"),
    )
    assert note.startswith("The paper's CIFAR-100 configuration")
