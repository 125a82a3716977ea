import pytest

from ldm.cli import override_config
from ldm.config import from_dict, parse_value, to_dict
from ldm.train import TrainConfig
from ldm.unet import UNetConfig


def test_json_round_trip_keeps_nested_tuples():
    config = TrainConfig.mnist().with_(min_snr_gamma=5.0)
    back = from_dict(TrainConfig, to_dict(config))
    assert back == config and isinstance(back.unet.channel_mult, tuple) and isinstance(back.unet, UNetConfig)


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="unknown UNetConfig field.*widht"):
        from_dict(UNetConfig, {"widht": 3})


def test_parse_values_by_annotation():
    assert parse_value(UNetConfig, "channel_mult", "1,2,4") == (1, 2, 4)
    assert parse_value(UNetConfig, "attention", "false,true") == (False, True)
    assert parse_value(UNetConfig, "num_classes", "none") is None
    assert parse_value(UNetConfig, "num_classes", "10") == 10
    assert parse_value(TrainConfig, "prediction", "v") == "v"
    with pytest.raises(ValueError, match="prediction must be one of"):
        parse_value(TrainConfig, "prediction", "score")
    with pytest.raises(ValueError, match="expects int"):
        parse_value(UNetConfig, "channels", "wide")


def test_cli_overrides_reach_nested_configs():
    c = override_config(TrainConfig.mnist(), ["--lr", "5e-4", "--unet.channels", "48", "--kind", "linear",
                                              "--mixed-precision", "bf16", "--channel-mult", "1,2",
                                              "--attention", "false,true"])
    assert c.loop.lr == 5e-4 and c.unet.channels == 48 and c.schedule.kind == "linear"
    assert c.loop.mixed_precision == "bf16" and c.unet.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="unknown option --colour"):
        override_config(TrainConfig.mnist(), ["--colour", "red"])
    with pytest.raises(ValueError, match="unknown option --vae.channels"):
        override_config(TrainConfig.mnist(), ["--vae.channels", "3"])


def test_with_routes_loop_fields():
    c = TrainConfig.mnist().with_(steps=7, lr=0.1, prediction="v")
    assert c.loop.steps == 7 and c.loop.lr == 0.1 and c.prediction == "v"
    assert c.loop.batch_size == TrainConfig.mnist().loop.batch_size
