"""The Debian packages the sources read: which are missing, `make system-packages`' install,
and the warning `make repro` prints before DVC for an optional source this machine lacks."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from pipeline.configbase import from_dict
from pipeline.data.base import DataError
from pipeline.data.mixing import MixtureConfig
from pipeline.data.packaged import _wordnet_files
from pipeline.data.sources import KINDS
from pipeline.recipe import DataConfig, compose, dump_params
from pipeline.runner import repro, system_packages
from pipeline.runner.recipe_ray import Outcome

REPO_ROOT = Path(__file__).resolve().parents[2]


def mixture(*sources: dict) -> MixtureConfig:
    base = {"name": "fortunes", "kind": "fortunes", "weight": 0.7, "domain": "web"}
    return from_dict(
        MixtureConfig, {"total_tokens": 1000, "kind": "text", "sources": [base, *sources]}, "data.pretrain"
    )


def data(pretrain: MixtureConfig, midtrain: MixtureConfig | None = None) -> DataConfig:
    return DataConfig(out_dir="data/mix", pretrain=pretrain, midtrain=midtrain or mixture(), sft=mixture())


def wordnet(path: Path, optional: bool = True) -> dict:
    return {"name": "wn", "kind": "wordnet", "weight": 0.3, "domain": "knowledge", "optional": optional,
            "options": {"path": str(path)}}  # fmt: skip


def test_wordnet_names_its_debian_package_and_is_missing_exactly_when_its_files_are():
    assert KINDS["wordnet"].debian == "wordnet-base"
    defaults = KINDS["wordnet"].resolve({})
    present = all(path.is_file() for path in _wordnet_files(defaults))
    assert ("wordnet-base" in system_packages.missing_packages(["wordnet"])) == (not present)
    assert system_packages.missing_packages(["fortunes", "arithmetic"]) == {}  # pip-shipped or generated


def test_missing_packages_names_the_package_and_the_absent_file(monkeypatch):
    def check(options):
        raise DataError("missing /nowhere/data.txt")

    monkeypatch.setitem(
        KINDS, "absent", dataclasses.replace(KINDS["wordnet"], name="absent", check=check, debian="pkg-x")
    )
    missing = system_packages.missing_packages(["absent", "fortunes"])
    assert list(missing) == ["pkg-x"] and "/nowhere/data.txt" in missing["pkg-x"]


def test_optional_source_without_its_data_is_warned_about_naming_role_source_and_fix(tmp_path):
    (warning,) = system_packages.skipped_sources(data(mixture(), midtrain=mixture(wordnet(tmp_path / "none"))))
    assert warning.startswith("data.midtrain: optional source 'wn' (wordnet) unavailable")
    assert (
        str(tmp_path / "none" / "data.noun") in warning
        and "make system-packages` as root installs wordnet-base" in warning
    )


def test_no_warning_for_present_data_or_a_required_source_and_one_per_source(tmp_path):
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    assert system_packages.skipped_sources(data(mixture(wordnet(tmp_path)))) == []
    # A required source is the mix stage's input check to refuse, not a warning.
    assert system_packages.skipped_sources(data(mixture(wordnet(tmp_path / "none", optional=False)))) == []
    twice = mixture(wordnet(tmp_path / "none"))
    assert len(system_packages.skipped_sources(data(twice, midtrain=twice))) == 1


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """An ``apt-get`` first on PATH that appends each call's arguments to a file and, like an
    image without package lists, fails an install until ``update`` has run."""
    calls, updated = tmp_path / "apt-calls", tmp_path / "apt-updated"
    script = tmp_path / "bin" / "apt-get"
    script.parent.mkdir()
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'if [ "$1" = update ]; then touch {updated}; exit 0; fi\n'
        f"[ -e {updated} ] || exit 100\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_install_runs_apt_get_as_root_only_and_updates_the_lists_after_a_failure(fake_apt, monkeypatch):
    monkeypatch.setattr(system_packages.os, "geteuid", lambda: 1000)
    assert not system_packages.install(["pkg-a"]) and not fake_apt.exists()
    monkeypatch.setattr(system_packages.os, "geteuid", lambda: 0)
    assert system_packages.install([]) and not fake_apt.exists()
    assert system_packages.install(["pkg-a", "pkg-b"])
    install = "install -y --no-install-recommends pkg-a pkg-b"
    assert fake_apt.read_text().splitlines() == [install, "update", install]
    assert system_packages.install(["pkg-a", "pkg-b"])  # the lists are there now: one call
    assert fake_apt.read_text().splitlines()[3:] == [install]


@pytest.fixture
def wordnet_absent(monkeypatch):
    """This machine as one without Debian's wordnet-base."""

    def check(options):
        raise DataError("missing /usr/share/wordnet/data.noun")

    monkeypatch.setitem(KINDS, "wordnet", dataclasses.replace(KINDS["wordnet"], check=check))


def test_setup_step_never_fails_and_says_how_to_install(wordnet_absent, fake_apt, monkeypatch, capsys, tmp_path):
    default = ["--install", "--params", str(REPO_ROOT / "params.yaml")]
    monkeypatch.setattr(system_packages.os, "geteuid", lambda: 1000)
    assert system_packages.main(default) == 0
    err = capsys.readouterr().err
    assert "Debian package 'wordnet-base' is absent" in err and not fake_apt.exists()
    assert "sudo apt-get update && sudo apt-get install -y --no-install-recommends wordnet-base" in err
    # As root apt-get runs; the package is still missing afterwards (the fake installs
    # nothing), so the warning stands.
    monkeypatch.setattr(system_packages.os, "geteuid", lambda: 0)
    assert system_packages.main(default) == 0
    assert fake_apt.read_text().split()[-1] == "wordnet-base"
    assert "warning: without wordnet-base" in capsys.readouterr().err
    # A machine without apt-get is told so, not given apt-get commands.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert system_packages.main(default[1:]) == 0
    err = capsys.readouterr().err
    assert "this machine has no apt-get" in err and "sudo" not in err


def test_only_the_configured_recipes_sources_count(wordnet_absent, fake_apt, monkeypatch, capsys, tmp_path):
    """The micro preset (what the e2e tests run through `make repro`) reads no system
    package: nothing is installed or said, also as root on a machine without WordNet."""
    micro = tmp_path / "params.yaml"
    micro.write_text(dump_params(compose(["experiment=micro"])))
    assert "wordnet" not in system_packages.recipe_kinds(micro)
    assert "wordnet" in system_packages.recipe_kinds(REPO_ROOT / "params.yaml")
    monkeypatch.setattr(system_packages.os, "geteuid", lambda: 0)
    assert system_packages.main(["--install", "--params", str(micro)]) == 0
    assert not fake_apt.exists() and capsys.readouterr().err == ""
    # A params file it cannot read is the recipe's preflight to refuse: one line, no install.
    micro.write_text("ray:\n  num_workers: many\n")
    assert system_packages.main(["--install", "--params", str(micro)]) == 0
    assert "not checked" in capsys.readouterr().err and not fake_apt.exists()


def test_repro_warns_before_dvc_runs(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (src,) = [s for s in params["data"]["pretrain"]["sources"] if s["kind"] == "wordnet"]
    src["options"] = {"path": str(tmp_path / "none")}
    params["tracking"]["enabled"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    ran = []

    def run_in_ray(ray_cfg, command, env):  # stands in for Ray and DVC: records what would run
        ran.append((command, capsys.readouterr().err))
        return Outcome(0, False)

    monkeypatch.setattr(repro, "run_in_ray", run_in_ray)
    assert repro.main(["--params", str(path), "--", "--dry"]) == 0
    ((command, said_before),) = ran
    assert command[1:] == ["repro", "--dry"]
    assert f"warning: data.pretrain: optional source '{src['name']}' (wordnet) unavailable" in said_before
