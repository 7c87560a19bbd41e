"""``make params``'s fast path (pipeline/runner/params.py): it skips the composition only
when conf/, the composer and the output are exactly as at the last regeneration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pipeline.recipe
from pipeline.runner import params

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "conf" / "stage").mkdir(parents=True)
    (repo / "pipeline").mkdir()
    (repo / "conf" / "config.yaml").write_text("seed: 0\n")
    (repo / "conf" / "stage" / "qat.yaml").write_text("group_size: 32\n")
    (repo / "pipeline" / "recipe.py").write_text("# composer\n")
    return repo


def test_the_inputs_digest_follows_every_conf_file_and_the_composer(tmp_path):
    repo = _fake_repo(tmp_path)
    digests = [params.inputs_digest(repo)]
    (repo / "conf" / "stage" / "qat.yaml").write_text("group_size: 64\n")  # an edit
    digests.append(params.inputs_digest(repo))
    (repo / "conf" / "stage" / "sft.yaml").write_text("")  # a new, empty file
    digests.append(params.inputs_digest(repo))
    (repo / "pipeline" / "recipe.py").write_text("# composer v2\n")
    digests.append(params.inputs_digest(repo))
    shutil.move(repo / "conf" / "stage" / "sft.yaml", repo / "conf" / "sft.yaml")  # same bytes, moved
    digests.append(params.inputs_digest(repo))
    shared = tmp_path / "shared_models"  # a conf group kept elsewhere, linked in (Hydra follows it)
    shared.mkdir()
    (shared / "tiny.yaml").write_text("d_model: 128\n")
    (repo / "conf" / "model").symlink_to(shared, target_is_directory=True)
    digests.append(params.inputs_digest(repo))
    (shared / "tiny.yaml").write_text("d_model: 256\n")  # an edit behind the link
    digests.append(params.inputs_digest(repo))
    assert len(set(digests)) == len(digests)
    assert params.inputs_digest(repo) == digests[-1]  # and it is a function of them


def test_a_stamped_output_skips_the_composition_and_anything_else_does_not(tmp_path, monkeypatch):
    out, stamp = tmp_path / "params.yaml", tmp_path / "stamp.json"
    assert params.main(["-o", str(out), "--stamp", str(stamp)]) == 0  # the real composition
    assert out.read_text() == pipeline.recipe.dump_params(pipeline.recipe.compose())
    assert json.loads(stamp.read_text())["inputs"] == params.inputs_digest()

    calls = []
    real = pipeline.recipe.main

    def counting(argv):
        calls.append(argv)
        return real(argv)

    monkeypatch.setattr(pipeline.recipe, "main", counting)
    assert params.main(["-o", str(out), "--stamp", str(stamp)]) == 0
    assert calls == []  # up to date: no composition
    assert params.main(["-o", str(out), "--stamp", str(stamp), "--force"]) == 0
    assert len(calls) == 1  # --force always regenerates

    # A hand edit is not skipped over: the full path names it and refuses (exit 2).
    out.write_text(out.read_text().replace("seed: 0", "seed: 7", 1))
    assert params.main(["-o", str(out), "--stamp", str(stamp)]) == 2
    assert len(calls) == 2 and "seed: 7" in out.read_text()
    assert not params.up_to_date(out, stamp)  # the refusal did not stamp the edited file


@pytest.mark.parametrize("stamp_text", ["", "{not json", "[]", '{"inputs": "x"}'])
def test_a_missing_or_damaged_stamp_means_regenerate(tmp_path, stamp_text):
    out, stamp = tmp_path / "params.yaml", tmp_path / "stamp.json"
    out.write_text("seed: 0\n")
    if stamp_text:
        stamp.write_text(stamp_text)
    assert not params.up_to_date(out, stamp)
