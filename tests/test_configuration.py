"""Settings: every variable is documented, and bad values are named at start-up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from koerier.config import ConfigError, Settings, load_settings
from tests.harness import KOERIER

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented(name):
    assert f"`KOERIER_{name.upper()}`" in DOC.read_text()


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("KOERIER_DB_PORT", "not-a-port", "KOERIER_DB_PORT"),
    ("KOERIER_TRUSTED_PROXIES", "10.0.0.0/8,proxy.example", "proxy.example"),
    ("KOERIER_PUBLIC_URL", "notificaties.example", "http:// or https://"),
    ("KOERIER_LOG_FORMAT", "xml", "KOERIER_LOG_FORMAT"),
])
def test_invalid_value_is_named_in_the_configuration_error(monkeypatch, variable, value, words):
    monkeypatch.setenv("KOERIER_ENV_FILE", "/dev/null")
    monkeypatch.setenv("KOERIER_ENVIRONMENT", "development")
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert any(words in problem for problem in raised.value.problems)


def test_env_file_is_read_and_the_environment_wins(monkeypatch, tmp_path):
    env_file = tmp_path / "koerier.env"
    env_file.write_text("KOERIER_ENVIRONMENT=development\nKOERIER_DB_NAME=from_file\n"
                        "KOERIER_DB_HOST=file-host\n")
    monkeypatch.setenv("KOERIER_ENV_FILE", str(env_file))
    monkeypatch.setenv("KOERIER_DB_HOST", "env-host")
    monkeypatch.delenv("KOERIER_DB_NAME", raising=False)  # set by the session fixtures

    loaded = load_settings()

    assert loaded.db_name == "from_file"
    assert loaded.db_host == "env-host"


def test_cli_without_env_file_names_the_files_it_looked_for(tmp_path):
    # Only KOERIER_* set by the session's fixtures are dropped: the command must find none.
    env = {key: value for key, value in os.environ.items() if not key.startswith("KOERIER_")}

    result = subprocess.run([str(KOERIER), "client", "list"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert str(tmp_path / "koerier.env") in result.stderr
    assert "/etc/koerier/koerier.env" in result.stderr
