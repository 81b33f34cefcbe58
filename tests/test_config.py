import pytest

from hpseg.config import Config, load_preset, preset_names


def test_shipped_presets_carry_the_paper_values():
    assert preset_names() == ["cityscapes27", "cocostuff27", "potsdam3"]
    coco = load_preset("cocostuff27")
    assert (coco.method.tau, coco.method.rho, coco.method.warmup, coco.method.ema_momentum) == (0.8, 0.02, 1000, 0.99)
    assert (coco.method.alpha, coco.method.renew_interval, coco.train.epochs) == (0.05, 100, 3)
    city = load_preset("cityscapes27")
    assert (city.method.tau, city.method.warmup, city.method.ema_momentum, city.train.epochs) == (0.6, 50, 0.999, 30)
    potsdam = load_preset("potsdam3")
    assert (potsdam.method.dim, potsdam.method.n_classes, potsdam.method.rho, potsdam.method.alpha) == (256, 3, 1.0, 0.0)
    assert (potsdam.method.pool_size, potsdam.train.val_interval, potsdam.backbone.name) == (1024, 50, "dino_vitb8")


def test_overrides_are_typed():
    config = Config().override(["train.batch_size=16", "method.tau=0.5", "method.reweighting=false",
                                "backbone.weights=/x.pth", "method.contrast_draw=independent"])
    assert config.train.batch_size == 16 and config.method.tau == 0.5 and config.method.reweighting is False
    assert config.backbone.weights == "/x.pth" and config.method.contrast_draw == "independent"
    assert Config().override(["optim.head_lr=2e-3"]).optim.head_lr == 0.002


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batchsize=3", "unknown config key 'train.batchsize'"),
        ("nope.x=1", "unknown config section"),
        ("train.batch_size=big", "expected a value of type int"),
        ("method.contrast_draw=sometimes", "expected one of"),
        ("train.selection", "section.field=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        Config().override([override])


def test_yaml_round_trip(tmp_path):
    config = Config().override(["train.seed=7", "data.root=/data"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_preset(str(path)) == config


def test_missing_preset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_preset(str(tmp_path / "nothere.yaml"))
