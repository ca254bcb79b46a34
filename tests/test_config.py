"""Configuration layering: profile files, an external folder, environment, command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import load_config
from app.errors import ConfigError


def test_defaults_are_the_local_profile() -> None:
    config = load_config({})
    assert config.profile == "local"
    assert (config.worker.core_size, config.worker.max_size, config.worker.queue_capacity) == (
        4,
        8,
        100,
    )
    assert config.grpc.port is None
    assert config.grpc.default_port == 9091
    assert config.schedule.report_interval_seconds == 5.0
    assert (config.redis.key_prefix, config.redis.ttl_seconds) == ("wpm-apps", 60)
    assert not config.redis.configured


def test_live_profile_uses_tls_and_no_embedded_redis() -> None:
    config = load_config({"PROFILE": "live", "JOBWORKER_REDIS__HOST": "cache.internal"})
    assert config.redis.effective_url() == "rediss://cache.internal:6379/0"
    assert not config.redis.embedded


def test_layers_win_in_order(tmp_path: Path) -> None:
    (tmp_path / "application.toml").write_text("[worker]\ncore_size = 2\nmax_size = 3\n")
    (tmp_path / "application-local.toml").write_text("[worker]\nmax_size = 6\n")
    env = {"JOBWORKER_WORKER__MAX_SIZE": "7", "JOBWORKER_WORKER__JOB_MODULES": '["a.b", "c"]'}
    config = load_config(env, config_dir=tmp_path, overrides={"grpc.port": 9500})
    assert (config.worker.core_size, config.worker.max_size) == (2, 7)
    assert config.worker.job_modules == ["a.b", "c"]
    assert config.grpc.port == 9500
    # the folder can come from the environment, as run.sh's config/ does
    config = load_config({"JOBWORKER_CONFIG_DIR": str(tmp_path)})
    assert config.worker.max_size == 6


def test_a_profile_only_in_the_external_folder(tmp_path: Path) -> None:
    (tmp_path / "application-stg.toml").write_text('[redis]\nurl = "redis://stg:6379/1"\n')
    config = load_config({"PROFILE": "stg"}, config_dir=tmp_path)
    assert config.redis.url == "redis://stg:6379/1"


def test_redis_url_overrides_the_profile() -> None:
    config = load_config({"PROFILE": "live", "REDIS_URL": "unix:///run/redis.sock"})
    assert config.redis.effective_url() == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("env", "files", "message"),
    [
        ({"JOBWORKER_GRPC__PORT": "70000"}, {},
         "grpc.port (from JOBWORKER_GRPC__PORT): must be 0..65535"),
        ({"JOBWORKER_LOG__LEVEL": "LOUD"}, {},
         "log.level (from JOBWORKER_LOG__LEVEL): must be one of"),
        ({"JOBWORKER_WORKER__": "1"}, {}, "JOBWORKER_WORKER__: empty section or key"),
        ({"JOBWORKER_GRPC__MAX_RECEIVE_MESSAGE_BYTES": "10"}, {},
         "grpc.max_receive_message_bytes (from JOBWORKER_GRPC__MAX_RECEIVE_MESSAGE_BYTES):"
         " must be 1024..2147483647"),
        ({"JOBWORKER_GRPC__MAX_HEADER_LIST_BYTES": "big"}, {},
         "grpc.max_header_list_bytes (from JOBWORKER_GRPC__MAX_HEADER_LIST_BYTES): expected `int`"),
        ({"JOBWORKER_GRPC__MAX_CONCURRENT_STREAMS": "0"}, {},
         "grpc.max_concurrent_streams (from JOBWORKER_GRPC__MAX_CONCURRENT_STREAMS): must be"),
        ({}, {"application-local.toml": "[grpc]\nhandshake_timeout_seconds = 0\n"},
         "grpc.handshake_timeout_seconds (from "),
        ({"JOBWORKER_WORKER__MAX_RESULT_BYTES": "0"}, {},
         "worker.max_result_bytes (from JOBWORKER_WORKER__MAX_RESULT_BYTES): must be at least 1"),
        ({}, {"application-local.toml": "[worker\n"}, "application-local.toml: not valid TOML"),
        ({}, {"application-local.toml": "[worker]\nwatermark = 'high'\n"},
         "worker.watermark (from "),
        ({"JOBWORKER_REDIS__SENTINELS": '["s1:26379", "s2"]', "JOBWORKER_REDIS__MASTER_NAME": "m"},
         {}, 'redis.sentinels (from JOBWORKER_REDIS__SENTINELS): each must be "host:port", got'),
        ({"JOBWORKER_REDIS__SENTINELS": '["s1:26379"]'}, {},
         "redis.master_name: must be set with redis.sentinels"),
        ({"JOBWORKER_REDIS__MASTER_NAME": "m"}, {},
         "redis.master_name (from JOBWORKER_REDIS__MASTER_NAME): needs redis.sentinels"),
        ({"JOBWORKER_REDIS__SENTINELS": '["s1:26379"]', "JOBWORKER_REDIS__MASTER_NAME": "m",
          "REDIS_URL": "redis://r:6379/0"}, {},
         "redis.sentinels (from JOBWORKER_REDIS__SENTINELS): give either redis.sentinels or"),
    ],
)  # fmt: skip
def test_errors_name_the_key_and_where_it_came_from(
    tmp_path: Path, env: dict[str, str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(env, config_dir=tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_sentinels_name_the_master_and_logs_never_show_a_password() -> None:
    config = load_config({"JOBWORKER_REDIS__SENTINELS": '["s1:26379", "[::1]:26380"]',
                          "JOBWORKER_REDIS__MASTER_NAME": "jobs"})  # fmt: skip
    assert config.redis.configured
    assert config.redis.sentinel_addresses() == [("s1", 26379), ("::1", 26380)]
    assert config.redis.display_url() == "redis+sentinel://s1:26379,[::1]:26380/jobs/0"
    secret = load_config({"REDIS_URL": "rediss://app:s3cret@cache:6380/2"})
    assert secret.redis.display_url() == "rediss://app:***@cache:6380/2"
