"""The commit stamped on runs, benchmarks and experiment results."""

import subprocess

import pytest

from star.training import provenance


def test_star_commit_variable_wins(monkeypatch):
    monkeypatch.setenv("STAR_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"


def test_checkout_commit_or_unknown(monkeypatch):
    monkeypatch.delenv("STAR_COMMIT", raising=False)
    top = subprocess.run(["git", "-C", str(provenance.PACKAGE_DIR), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True)
    if top.returncode != 0:
        pytest.skip("star is not imported from a git checkout here")
    head = subprocess.run(["git", "-C", top.stdout.strip(), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert provenance.git_commit().removesuffix("-dirty") == head


def test_a_repository_that_only_contains_the_install_is_not_star(monkeypatch, tmp_path):
    """A wheel installed in a venv inside some other git repository must not report that repository's commit."""
    monkeypatch.delenv("STAR_COMMIT", raising=False)
    package = tmp_path / ".venv" / "site-packages" / "star"
    package.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    assert provenance.git_commit() == "unknown"
