"""Random override sets never crash composition or validation: they only ever report problems."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmdeploy.cli.main import main
from glmdeploy.config.compose import GROUPS, group_options, schema_keys

KEYS = sorted(
    {
        f"{parent}.{leaf}" if parent else leaf
        for parent, leaves in schema_keys().items()
        for leaf in leaves
    }
)
OPTIONS = [f"{g}={o}" for g in GROUPS for o in group_options(g)]

scalars = st.one_of(
    st.integers(-5, 100_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "???",
            "24gb",
            "24GiB",
            "cpu",
            "disk",
            "cuda:0",
            "auto",
            "[0,1]",
            "[0,0]",
            "{0: 20}",
            "{a: 1}",
            "[]",
            "{}",
            "''",
            "'a b'",
            "${runtime.batch_size}",
            "${nope}",
            "[{modules:model.norm,device:0}]",
            "[{modules:[model.layers.0-9],device:cpu}]",
            "model.layers.3-1",
            "[1",
            "{",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcxyz._0", min_size=1, max_size=10))
prefixes = st.sampled_from(["", "", "", "+", "++", "~"])
override = st.one_of(
    st.sampled_from(OPTIONS),
    st.tuples(prefixes, keys, scalars).map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
    st.tuples(st.sampled_from(["~"]), keys).map(lambda t: f"{t[0]}{t[1]}"),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(override, max_size=6))
def test_random_overrides_only_ever_report(capsys: Any, overrides: list[str]) -> None:
    code = main(["validate", *overrides])
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    assert "Traceback" not in captured.err
    assert "internal error" not in captured.err
    if code == 2:
        assert captured.err.startswith("error: invalid deployment config (")
