"""What the set-up installs is what the recipe's fixed costs were measured with."""

from __future__ import annotations


def test_dvc_parses_yaml_with_ruamels_c_parser():
    """DVC reads dvc.yaml and dvc.lock (about 40 KB at the micro preset) several times per
    stage through ruamel.yaml's "safe" loader, which is libyaml's C parser only when
    ruamel.yaml.clib is installed and silently pure Python otherwise (measured: 2.5 s more
    DVC time per stage, a no-op ``dvc status`` 2.4 s instead of 0.9 s)."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not installed (requirements.lock pins it)"
    assert YAML(typ="safe").Parser is CParser
    assert parse_yaml("stages:\n  a: {cmd: echo}\n", "dvc.yaml") == {"stages": {"a": {"cmd": "echo"}}}
