"""pyproject.toml's [tool.flwr.app.config] must list every key: `flwr run --run-config` can
only override keys listed there."""

from __future__ import annotations

from pathlib import Path

from fedwa.run.config import all_known_keys, load_toml

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_lists_every_key_with_its_default() -> None:
    listed = load_toml(PYPROJECT)
    keys = all_known_keys()
    assert set(listed) == set(keys)
    for name, key in keys.items():
        assert listed[name] == key.default and type(listed[name]) is type(key.default), name


def test_flower_app_components_point_at_the_apps() -> None:
    import tomllib

    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedwa.apps.server_app:app",
                                 "clientapp": "fedwa.apps.client_app:app"}
    from fedwa.apps.client_app import app as client_app
    from fedwa.apps.server_app import app as server_app

    assert client_app is not None and server_app is not None


def test_readme_key_table_is_the_generated_one() -> None:
    from fedwa.run.config import markdown_table

    readme = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    assert markdown_table() in readme, "regenerate with `fedwa keys --markdown`"
