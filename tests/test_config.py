"""Start-config validation: every bad field is named in the error."""

from __future__ import annotations

import pytest

from amesh_ext.config import DEFAULT_SOURCE, ConfigError, parse_start_config


def test_defaults() -> None:
    cfg = parse_start_config("{}")
    assert cfg.source == DEFAULT_SOURCE
    assert cfg.limit("file_poll_interval") == 0.5


def test_valid_config_round_trips_fields() -> None:
    cfg = parse_start_config(
        '{"source": "file:///etc/mesh", "limits": {"file_poll_interval": 0.1},'
        ' "xds": {"protocol": "sotw"}, "translate": {"port_match_var": null},'
        ' "log_level": "debug"}')
    assert cfg.source == "file:///etc/mesh"
    assert cfg.limit("file_poll_interval") == 0.1
    assert cfg.xds == {"protocol": "sotw"}
    assert cfg.translate == {"port_match_var": None}


@pytest.mark.parametrize(("text", "named"), [
    ("not json", "not valid JSON"),
    ("[]", "must be an object"),
    ('{"sourcee": "file:///x"}', "sourcee"),
    ('{"source": "http://istiod:15010"}', "'source'"),
    ('{"source": 5}', "'source'"),
    ('{"limits": {"nope": 1}}', "limits.nope"),
    ('{"limits": {"file_poll_interval": -1}}', "limits.file_poll_interval"),
    ('{"limits": {"file_poll_interval": true}}', "limits.file_poll_interval"),
    ('{"xds": []}', "'xds'"),
    ('{"log_level": "loud"}', "log_level"),
])
def test_invalid_configs_name_the_field(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_start_config(text)
    assert named in str(info.value)
