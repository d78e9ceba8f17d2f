"""The commit stamped on runs, benchmarks and experiment results."""

import subprocess

import pytest

from star.training import provenance


def _git(*args, cwd):
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_star_commit_variable_wins(monkeypatch):
    monkeypatch.setenv("STAR_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"


def test_checkout_commit(monkeypatch):
    monkeypatch.delenv("STAR_COMMIT", raising=False)
    top = provenance.PACKAGE_DIR.parents[1]
    if not (top / ".git").exists():
        pytest.skip("star is not imported from a git checkout here")
    assert provenance.git_commit().removesuffix("-dirty") == _git("rev-parse", "--short", "HEAD", cwd=top)


def test_a_repository_that_only_contains_the_install_is_not_star(monkeypatch, tmp_path):
    """A wheel installed in a venv inside some other git repository must not report that repository's commit."""
    monkeypatch.delenv("STAR_COMMIT", raising=False)
    package = tmp_path / ".venv" / "site-packages" / "star"
    package.mkdir(parents=True)
    _git("init", "-q", cwd=tmp_path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "other", cwd=tmp_path)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    assert provenance.git_commit() == "unknown"
    checkout = (tmp_path / "src" / "star").resolve()  # the same repository, laid out like star's checkout
    checkout.mkdir(parents=True)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", checkout)
    assert provenance.git_commit() == _git("rev-parse", "--short", "HEAD", cwd=tmp_path)
