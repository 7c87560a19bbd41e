"""The Debian packages the sources read: which are missing, the set-up's install, and the
warning `make repro` prints for an optional source this machine lacks."""

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline.configbase import from_dict
from pipeline.data import system
from pipeline.data.base import DataError
from pipeline.data.mixing import MixtureConfig
from pipeline.data.sources import KINDS


def mixture(*sources: dict) -> MixtureConfig:
    base = {"name": "fortunes", "kind": "fortunes", "weight": 0.7, "domain": "web"}
    return from_dict(
        MixtureConfig, {"total_tokens": 1000, "kind": "text", "sources": [base, *sources]}, "data.pretrain"
    )


def wordnet(path: Path, optional: bool = True) -> dict:
    return {"name": "wn", "kind": "wordnet", "weight": 0.3, "domain": "knowledge", "optional": optional,
            "options": {"path": str(path)}}  # fmt: skip


@pytest.fixture
def absent_kind(monkeypatch):
    """A source kind whose system package is absent (its check always fails)."""

    def check(options):
        raise DataError("missing /nowhere/data.txt")

    kind = dataclasses.replace(KINDS["wordnet"], name="absent", check=check, debian="pkg-absent")
    monkeypatch.setitem(KINDS, "absent", kind)
    return kind


def test_wordnet_names_its_debian_package_and_is_missing_exactly_when_its_files_are():
    assert KINDS["wordnet"].debian == "wordnet-base"
    present = all(Path(f"/usr/share/wordnet/data.{pos}").is_file() for pos in ("noun", "verb", "adj", "adv"))
    assert ("wordnet-base" in system.missing_packages(["wordnet"])) == (not present)
    assert system.missing_packages(["fortunes", "arithmetic"]) == {}  # pip-shipped or generated: no package


def test_missing_packages_names_the_package_and_the_absent_file(absent_kind):
    missing = system.missing_packages(["absent", "fortunes"])
    assert list(missing) == ["pkg-absent"] and "/nowhere/data.txt" in missing["pkg-absent"]


def test_optional_source_without_its_data_is_warned_about_naming_role_source_and_fix(tmp_path):
    (warning,) = system.skipped_sources({"midtrain": mixture(wordnet(tmp_path / "none"))})
    assert warning.startswith("data.midtrain: optional source 'wn' (wordnet) unavailable")
    assert str(tmp_path / "none" / "data.noun") in warning
    assert "apt-get install -y --no-install-recommends wordnet-base" in warning


def test_no_warning_for_present_data_or_a_required_source(tmp_path):
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    assert system.skipped_sources({"pretrain": mixture(wordnet(tmp_path))}) == []
    # A required source is the mix stage's input check to refuse, not a warning.
    assert system.skipped_sources({"pretrain": mixture(wordnet(tmp_path / "none", optional=False))}) == []


def test_one_warning_per_source_across_mixtures(tmp_path):
    mix = mixture(wordnet(tmp_path / "none"))
    assert len(system.skipped_sources({"pretrain": mix, "midtrain": mix})) == 1


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """An ``apt-get`` on PATH that records its arguments instead of installing."""
    record = tmp_path / "apt-args"
    script = tmp_path / "bin" / "apt-get"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return record


def test_install_runs_apt_get_as_root_only(fake_apt, monkeypatch):
    monkeypatch.setattr(system.os, "geteuid", lambda: 1000)
    assert system.install(["pkg-a"]) == 1 and not fake_apt.exists()
    monkeypatch.setattr(system.os, "geteuid", lambda: 0)
    assert system.install([]) == 0 and not fake_apt.exists()
    assert system.install(["pkg-a", "pkg-b"]) == 0
    assert fake_apt.read_text().split() == ["install", "-y", "--no-install-recommends", "pkg-a", "pkg-b"]


def test_setup_step_never_fails_and_says_how_to_install(absent_kind, fake_apt, monkeypatch, capsys):
    monkeypatch.setattr(system, "missing_packages", lambda: {"pkg-absent": "source kind 'absent': missing"})
    monkeypatch.setattr(system.os, "geteuid", lambda: 1000)
    assert system.main(["--install"]) == 0
    err = capsys.readouterr().err
    assert "sudo apt-get install -y --no-install-recommends pkg-absent" in err and not fake_apt.exists()
    # As root the package is installed; still missing afterwards (the fake installs
    # nothing), so the warning stands.
    monkeypatch.setattr(system.os, "geteuid", lambda: 0)
    assert system.main(["--install"]) == 0
    assert fake_apt.read_text().split()[-1] == "pkg-absent" and "warning: without pkg-absent" in capsys.readouterr().err
