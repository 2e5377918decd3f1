"""Config from the environment: defaults, typed parsing, and one error naming every problem."""

import dataclasses

import pytest

from services.runtime.config import (
    Config,
    ConfigError,
    Env,
    InputLimits,
    Resources,
    parse_address,
    read_settings,
    service_address,
)

BASE = {"A2V_S3_ACCESS_KEY": "key", "A2V_S3_SECRET_KEY": "secret"}


def test_defaults_when_only_required_values_are_set():
    config = Config.from_env("audio", BASE)
    assert config.server.service == "audio"
    assert config.server.listen == "127.0.0.1:0"
    assert config.server.max_message_bytes == 4 * 1024 * 1024
    assert config.store.endpoint == "127.0.0.1:8333"
    assert config.store.bucket == "audio2video"
    assert config.store.secure is False


def test_values_are_parsed_with_types():
    env = BASE | {
        "A2V_LISTEN": "0.0.0.0:50051",
        "A2V_MAX_WORKERS": "4",
        "A2V_GRACE_SECONDS": "2.5",
        "A2V_S3_SECURE": "true",
        "A2V_LOG_LEVEL": "debug",
    }
    config = Config.from_env("face", env)
    assert config.server.listen == "0.0.0.0:50051"
    assert config.server.max_workers == 4
    assert config.server.grace_seconds == 2.5
    assert config.store.secure is True
    assert config.server.log_level == "DEBUG"


def test_config_is_frozen():
    config = Config.from_env("audio", BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = "x:1"  # type: ignore[misc]


def test_missing_required_values_fail_fast_naming_each():
    with pytest.raises(ConfigError) as err:
        Config.from_env("audio", {})
    assert "A2V_S3_ACCESS_KEY" in str(err.value)
    assert "A2V_S3_SECRET_KEY" in str(err.value)


def test_every_malformed_value_is_reported_at_once():
    env = BASE | {"A2V_MAX_WORKERS": "many", "A2V_GRACE_SECONDS": "-1", "A2V_S3_SECURE": "maybe"}
    with pytest.raises(ConfigError) as err:
        Config.from_env("audio", env)
    message = str(err.value)
    assert "A2V_MAX_WORKERS='many' is not an integer" in message
    assert "A2V_GRACE_SECONDS=-1.0 is below the minimum" in message
    assert "A2V_S3_SECURE='maybe' is not a boolean" in message


def test_bad_addresses_are_rejected():
    with pytest.raises(ConfigError, match="not host:port"):
        Config.from_env("audio", BASE | {"A2V_LISTEN": "nowhere"})
    assert parse_address("[::1]:50051") == ("::1", 50051)
    with pytest.raises(ConfigError):
        parse_address("host:99999")


def test_secret_never_appears_in_repr():
    config = Config.from_env("audio", BASE)
    assert "secret" not in repr(config.store).replace("secret_key", "")


def test_service_address_from_environment_or_default():
    assert service_address("texture", {"A2V_TEXTURE_ADDR": "dns:///texture:50054"}) == "dns:///texture:50054"
    assert service_address("texture", {}, default="127.0.0.1:1") == "127.0.0.1:1"
    with pytest.raises(ConfigError, match="A2V_TEXTURE_ADDR"):
        service_address("texture", {})


def test_env_reader_ranges_and_blank_values():
    env = Env({"N": "5", "BLANK": "  "})
    assert env.get_int("N", 1, maximum=3) == 5
    assert env.get_str("BLANK", "fallback") == "fallback"
    with pytest.raises(ConfigError, match="N=5 is above the maximum 3"):
        env.check()


def test_stage_settings_are_read_with_the_rest_of_the_config():
    from services.audio.servicer import read_settings as audio_settings
    from services.face.servicer import read_settings as face_settings
    from services.lipsync.servicer import LipsyncSettings
    from services.texture.servicer import TextureSettings

    config = Config.from_env("audio", BASE, settings=audio_settings)
    assert config.settings == InputLimits(max_seconds=1800.0, max_input_bytes=None, resources=Resources())
    assert Resources() == Resources(memory_bytes=2 << 30, scratch_bytes=2 << 30)
    assert Config.from_env("x", BASE).settings is None
    environ = BASE | {
        "A2V_FACE_MAX_SECONDS": "60",
        "A2V_FACE_MAX_INPUT_BYTES": "1000",
        "A2V_MEMORY_BYTES": str(1 << 30),
        "A2V_SCRATCH_BYTES": str(64 << 20),
        "A2V_TEXTURE_CACHE_BYTES": "0",
        "A2V_TFSERVING_ADDR": "tfs:8500",
    }
    assert read_settings(face_settings, environ) == InputLimits(60.0, 1000, Resources(1 << 30, 64 << 20))
    assert read_settings(audio_settings, environ).max_seconds == 1800.0
    assert read_settings(TextureSettings.read, environ) == TextureSettings(
        cache_bytes=0, resources=Resources(1 << 30, 64 << 20)
    )
    assert read_settings(TextureSettings.read, {}) == TextureSettings(cache_bytes=2 << 30)
    assert read_settings(LipsyncSettings.read, environ).serving_address == "tfs:8500"
    assert read_settings(LipsyncSettings.read, {}).serving_address == "127.0.0.1:8500"
    with pytest.raises(ConfigError) as caught:
        Config.from_env("face", BASE | {"A2V_FACE_MAX_SECONDS": "0", "A2V_LISTEN": ""}, settings=face_settings)
    assert "A2V_FACE_MAX_SECONDS=0.0 is below the minimum 1.0" in str(caught.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.max_seconds = 1  # type: ignore[misc]
