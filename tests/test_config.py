"""Typed configs: YAML loading, dotted overrides, and the errors they raise."""

import dataclasses

import pytest

from lm.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str = "a"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    flags: list[int] = dataclasses.field(default_factory=list)
    extra: dict[str, int] = dataclasses.field(default_factory=dict)
    maybe: int | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 3e-4\n  steps: 5\nflags: [1, 2]\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "extra.k=3", "maybe=4"])
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.steps == 7
    assert cfg.flags == [1, 2] and cfg.extra == {"k": 3} and cfg.maybe == 4
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"lrr": 1.0}}, "unknown config key 'inner.lrr'"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"inner": {"steps": "many"}}, "config key 'inner.steps': expected an integer"),
        ({"inner": {"lr": "fast"}}, "config key 'inner.lr': expected a number"),
        ({"flags": 3}, "config key 'flags': expected a list"),
        ({"inner": 5}, "config key 'inner': expected a mapping"),
    ],
)
def test_bad_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        apply_overrides({}, ["inner.lr"])
    with pytest.raises(ConfigError, match="'inner' is not a config section"):
        apply_overrides({"inner": 3}, ["inner.lr=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
