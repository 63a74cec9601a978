"""The config schema: defaults, YAML overrides, command-line overrides, and clear errors."""

import re
from pathlib import Path

import pytest
import yaml

from crfrnn_deeplab.training.config import Config, ConfigError, config_from_dict, load_config, resolve_config
from crfrnn_deeplab.training.config import save_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "configs" / "synthetic.yaml"


def test_defaults_are_the_deeplab_v2_recipe():
    cfg = Config()
    assert (cfg.stage1.lr, cfg.stage1.momentum, cfg.stage1.weight_decay, cfg.stage1.poly_power) == (
        2.5e-4, 0.9, 5e-4, 0.9)
    assert (cfg.stage1.batch_size, cfg.data.crop_size, cfg.stage1.iterations) == (10, 321, 20000)
    assert cfg.data.scale_range == [0.5, 1.5] and cfg.model.name == "deeplabv2_resnet101_msc"


def test_yaml_overrides_only_what_it_lists(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  dataset: synthetic\nmodel:\n  num_classes: 6\nstage1:\n  lr: 1e-3\n")
    cfg = load_config(path)
    assert cfg.stage1.lr == 1e-3 and isinstance(cfg.stage1.lr, float)
    assert cfg.stage1.momentum == 0.9 and cfg.stage1.batch_size == 10  # untouched defaults
    assert cfg.data.crop_size == 321


def test_command_line_overrides_come_last_and_are_typed():
    cfg = load_config(SYNTHETIC, ["stage1.lr=0.5", "stage1.iterations=3", "crf.learn_bandwidths=false",
                                  "model.options.base_width=8", "data.root=2012", "grid_search.theta_betas=[1, 2]",
                                  "model.init_from=null"])
    assert cfg.stage1.lr == 0.5 and cfg.stage1.iterations == 3 and cfg.crf.learn_bandwidths is False
    assert cfg.model.options == {"base_width": 8, "norm": "batch", "head": "largefov"}  # one entry changed
    assert cfg.data.root == "2012"  # a string field keeps the text
    assert cfg.grid_search.theta_betas == [1.0, 2.0] and cfg.model.init_from is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.lrr=0.1", r"unknown config key 'stage1.lrr'; known keys here: iterations, batch_size"),
        ("nope=1", r"unknown config key 'nope'"),
        ("stage1.iterations=many", r"stage1.iterations: expected int, got str 'many'"),
        ("stage1.iterations=2.5", r"stage1.iterations: expected int, got float 2.5"),
        ("crf.learn_bandwidths=maybe", r"crf.learn_bandwidths: expected bool, got str 'maybe'"),
        ("data.dataset=pascal", r"data.dataset: expected one of 'cityscapes', 'coco_stuff', 'folder', 'synthetic'"),
        ("grid_search.theta_alphas=[1, x]", r"grid_search.theta_alphas\[1\]: expected float, got str 'x'"),
        ("stage1=3", r"stage1: expected a mapping of iterations, batch_size"),
        ("stage1.lr", r"override 'stage1.lr' is not key=value"),
        ("stage1.batch_size=0", r"stage1.batch_size must be >= 1, got 0"),
        ("data.scale_range=[2, 1]", r"data.scale_range: expected \[min, max\] with 0.1 <= min <= max <= 8"),
        # numbers are finite and in range
        ("crf.theta_alpha=nan", r"crf.theta_alpha must be a finite number, got nan"),
        ("stage1.lr=nan", r"stage1.lr must be a finite number, got nan"),
        ("stage2.crf_lr=inf", r"stage2.crf_lr must be a finite number, got inf"),
        ("grid_search.theta_betas=[1, .nan]", r"grid_search.theta_betas\[1\] must be a finite number"),
        ("stage1.lr=-0.1", r"stage1.lr must be >= 0, got -0.1"),
        ("stage2.momentum=1", r"stage2.momentum must be in \[0, 1\), got 1"),
        ("stage2.max_grad_norm=-1", r"stage2.max_grad_norm must be >= 0, got -1"),
        ("stage2.max_grad_norm=nan", r"stage2.max_grad_norm must be a finite number, got nan"),
        ("data.hflip_prob=1.5", r"data.hflip_prob must be in \[0, 1\], got 1.5"),
        ("crf.theta_beta=0", r"crf.theta_beta must be > 0, got 0"),
        ("grid_search.theta_alphas=[10, -1]", r"grid_search.theta_alphas\[1\] must be > 0, got -1"),
        ("seed=-1", r"seed must be in \[0, 4294967295\], got -1"),
        # names that must exist do
        ("model.name=deeplabv3", r"model.name: expected one of 'deeplabv2_resnet101', .*, got 'deeplabv3'"),
        ("model.options.widht=8", r"model.options: \['widht'\] not options of 'deeplabv2_resnet18'; its options: "),
        ("crf.normalization=before", r"crf.normalization: expected one of 'symmetric', 'after', got 'before'"),
        ("crf.bilateral_filter=dense", r"crf.bilateral_filter: expected one of 'auto', 'lattice', 'exact', got 'dense'"),
        ("eval.mode=tiled", r"eval.mode: expected one of 'whole', 'sliding', got 'tiled'"),
        ("model.init_layout=caffe", r"model.init_layout: expected one of 'auto', 'caffe_deeplabv2', .*got 'caffe'"),
        ("model.num_classes=21", r"model.num_classes=21, but dataset 'synthetic' has 6 classes"),
        ("device=gpu", r"device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        # values the types and ranges allow but the model, the transforms or the CRF cannot use (found by
        # building them: the builder's and the CRF's own checks, the model's smallest input)
        ("model.options.base_width=abc", r"model.options of 'deeplabv2_resnet18': base_width must be a positive int, got 'abc'"),
        ("model.options.base_width=0", r"base_width must be a positive int, got 0"),
        ("model.options.base_width=-4", r"base_width must be a positive int, got -4"),
        ("model.options.base_width=2.5", r"base_width must be a positive int, got 2.5"),
        ("model.options.norm=foo", r"model.options of 'deeplabv2_resnet18': norm must be one of .*got 'foo'"),
        ("model.options.head=foo", r"model.options of 'deeplabv2_resnet18': head must be one of .*got 'foo'"),
        ("data.crop_size=7", r"data.crop_size=7 is smaller than the 8 pixels 'deeplabv2_resnet18' takes"),
        ("data.scale_range=[0.01, 0.01]", r"data.scale_range: expected \[min, max\] with 0.1 <= min"),
        ("data.scale_range=[1e-9, 1e9]", r"data.scale_range: expected \[min, max\] with 0.1 <= min <= max <= 8"),
        ("model.num_classes=256", r"model.num_classes must be in \[1, 255\], got 256"),
        ("crf.theta_alpha=1e-300", r"crf: theta_alpha=1e-300 is 0 or infinite in float32"),
        ("grid_search.theta_betas=[1e-300, 5]", r"grid_search: the smallest values of the grid do not make a CRF"),
        ("crf.spatial_weight=-3", r"crf.spatial_weight must be >= 0, got -3"),
        ("grid_search.bilateral_weights=[-5]", r"grid_search.bilateral_weights\[0\] must be >= 0, got -5"),
        ("out_dir=", r"out_dir must name a directory"),
        ("device=cuda:64", r"device=cuda:64: "),
        ("stage1=3", r"stage1: expected a mapping of iterations, batch_size"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SYNTHETIC, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a mapping or a list where the schema has something else: the key and what it expects, OmegaConf's
        # containers shown as the dict / list they hold
        (["data.scale_range={}"], r"data.scale_range: expected a list of float, got dict \{\}"),  # was a bare TypeError
        (["grid_search.theta_alphas={}"], r"grid_search.theta_alphas: expected a list of float, got dict \{\}"),
        (["data.folder.class_names={}"], r"data.folder.class_names: expected a list of str, got dict \{\}"),
        (["grid_search.theta_alphas=[{}]"], r"grid_search.theta_alphas\[0\]: expected float, got dict \{\}"),
        (["data.scale_range=[[1], 2]"], r"data.scale_range\[0\]: expected float, got list \[1\]"),
        (["stage1.poly_power={}"], r"stage1.poly_power: expected float, got dict \{\}"),  # was "got DictConfig {}"
        (["stage1.poly_power=[]"], r"stage1.poly_power: expected float, got list \[\]"),
        (["seed={}"], r"seed: expected int, got dict \{\}"),
        (["model.options=[]"], r"model.options: expected a mapping, got list \[\]"),
        (["data.scale_range=null"], r"data.scale_range: expected a list of float, got null"),
        (["stage1=null"], r"stage1: expected a mapping of iterations, .*, got null"),
        (["model.options.scales=[1, 2]", "model.options.scales={}"],  # untyped option values: a bare TypeError
         r"model.options.scales: expected a list like the value it replaces \(\[1, 2\]\), got dict \{\}"),
    ],
)
def test_a_value_of_the_wrong_shape_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + message + "$"):
        load_config(SYNTHETIC, overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        ("data:\n  scale_range: {}\n", r"data.scale_range: expected a list of float, got dict \{\}"),
        ("stage1:\n  poly_power: {}\n", r"stage1.poly_power: expected float, got dict \{\}"),
        # a mapping inside a list of numbers was let through, then failed in OmegaConf (a ValidationError)
        ("grid_search:\n  theta_alphas: [{}]\n", r"grid_search.theta_alphas\[0\]: expected float, got dict \{\}"),
        ("data:\n  folder:\n    class_names: [{}]\n", r"data.folder.class_names\[0\]: expected str, got dict \{\}"),
    ],
)
def test_a_value_of_the_wrong_shape_in_a_file_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(str(path)) + ": " + message + "$"):
        load_config(path)


def test_an_empty_mapping_for_model_options_changes_nothing():
    assert load_config(SYNTHETIC, ["model.options={}"]) == load_config(SYNTHETIC)  # was "got AnyNode '{}'"


def test_interpolations_still_fill_lists_and_sections():
    cfg = load_config(SYNTHETIC, ["grid_search.theta_betas=${grid_search.bilateral_weights}", "stage1=${stage2}"])
    assert cfg.grid_search.theta_betas == cfg.grid_search.bilateral_weights and cfg.stage1 == cfg.stage2


def test_an_invalid_setting_names_the_file_or_checkpoint_it_comes_from(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  dataset: synthetic\nmodel:\n  num_classes: 6\nstage1:\n  lr: .nan\n")
    for overrides in ([], ["seed=3"]):  # an override of another key leaves the file's value the culprit
        with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: stage1.lr must be a finite number, got nan")):
            load_config(path, overrides)
    assert load_config(path, ["stage1.lr=1e-3"]).stage1.lr == 1e-3  # an override replaces it
    with pytest.raises(ConfigError, match=r"^stage1.momentum must be in \[0, 1\), got 2$"):  # the override's doing
        load_config(path, ["stage1.lr=1e-3", "stage1.momentum=2"])
    saved = config_from_dict({"data": {"dataset": "synthetic"}, "model": {"num_classes": 6}, "device": "cuda:99"},
                             source="last.pt (its config)")
    with pytest.raises(ConfigError, match=r"^last.pt \(its config\): device=cuda:99: "):
        resolve_config(saved, [], source="last.pt (its config)")
    assert resolve_config(saved, ["device=cpu"], source="last.pt (its config)").device == "cpu"


def test_a_bad_value_is_blamed_on_where_it_comes_from_not_on_the_first_error(tmp_path):
    # resolve_config compared only the first error: once an override fixed it, the file's next bad value lost its
    # source; and a file was blamed for a key it never set (data.root, which comes from the command line)
    voc = ROOT / "configs" / "voc12_deeplabv2.yaml"
    with pytest.raises(ConfigError, match=r"^data.root is required for dataset 'voc12_aug'"):
        load_config(voc)
    path = tmp_path / "myvoc.yaml"
    path.write_text(voc.read_text().replace("model:\n", "model:\n  options: {head: aspp}\n", 1))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: model.options of 'deeplabv2_resnet101_msc': head")):
        load_config(path, ["data.root=/data/voc"])
    saved = config_from_dict({"data": {"dataset": "synthetic"}, "model": {"num_classes": 6}, "device": "cuda:99",
                              "stage1": {"lr": float("nan")}}, source="last.pt (its config)")
    with pytest.raises(ConfigError, match=r"^last.pt \(its config\): stage1.lr must be a finite number"):
        resolve_config(saved, [], source="last.pt (its config)")
    with pytest.raises(ConfigError, match=r"^last.pt \(its config\): device=cuda:99: "):  # the second one
        resolve_config(saved, ["stage1.lr=0.1"], source="last.pt (its config)")
    with pytest.raises(ConfigError, match=r"^stage1.lr must be >= 0, got -1$"):  # the override's own
        resolve_config(saved, ["stage1.lr=-1", "device=cpu"], source="last.pt (its config)")
    # a mapping override sets only its own entries; an unrelated no-op override leaves the blame where it was
    with pytest.raises(ConfigError, match=r"^last.pt \(its config\): stage1.lr must be a finite number"):
        resolve_config(saved, ["stage1={batch_size: 2}", "model.num_classes=6"], source="last.pt (its config)")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: model.options of 'deeplabv2_resnet101_msc'")):
        load_config(path, ["data.root=/data/voc", "model.num_classes=21"])


@pytest.mark.parametrize("text, overrides, message", [
    # valid as the file gives them; the override of the key that decides makes them invalid: not the file's
    ("data:\n  dataset: synthetic\nmodel:\n  num_classes: 6\neval:\n  stride: 600\n", ["eval.mode=sliding"],
     r"eval.stride=600 must be <= eval.window=513"),
    ("data:\n  root: ''\n", ["data.dataset=voc12", "model.num_classes=21"], r"data.root is required for dataset 'voc12'"),
])
def test_a_value_an_override_made_invalid_is_not_blamed_on_the_file(tmp_path, text, overrides, message):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + message):
        load_config(path, overrides)
    with pytest.raises(ConfigError, match="^" + re.escape(str(path)) + ": " + message):  # all from the file: named
        _config_with(path, text, overrides)


def _config_with(path, text, overrides):
    """``text`` with the overrides written into the file itself, loaded (so every value comes from the file)."""
    data = yaml.safe_load(text) or {}
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, last = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


@pytest.mark.parametrize("overrides, key, problem", [
    (["model.options={base_width:", "8}"], "model.options", "is not valid YAML .*quote an override"),  # shell-split
    (["data.scale_range=[0.5,", "1.5]"], "data.scale_range", "is not valid YAML"),
    (["stage1.lr=[1,"], "stage1.lr", "is not valid YAML"),
    (["stage1.lr=${oops"], "stage1.lr", "cannot be read: "),  # were raw tracebacks (yaml, OmegaConf's grammar)
    (["out_dir=${oops"], "out_dir", "cannot be read: "),
])
def test_an_override_that_cannot_be_read_names_its_key(overrides, key, problem):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: the value .* {problem}"):
        load_config(SYNTHETIC, overrides)


def test_missing_placeholder_and_a_scalar_top_level(tmp_path):
    # OmegaConf's "???" (a value to be given later) keeps the value it would replace, for every kind of field
    assert load_config(SYNTHETIC, ["data.scale_range=???", "model.options=???"]) == load_config(SYNTHETIC)
    path = tmp_path / "five.yaml"
    path.write_text("5\n")  # was a raw OSError traceback ("Invalid loaded object type: int")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: cannot be read as a config, a YAML mapping")):
        load_config(path)
    path.write_text("stage1:\n  lr: ${oops\n")  # was OmegaConf's GrammarParseError traceback
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: ")):
        load_config(path)


def test_text_fields_keep_the_text_and_lists_replace():
    cfg = load_config(SYNTHETIC, ["out_dir=on", "data.root=1e3", "model.init_from=~", "data.scale_range=[0.5,2]",
                                  "model.options.head=aspp_s"])
    assert (cfg.out_dir, cfg.data.root, cfg.model.init_from) == ("on", "1e3", None)
    assert cfg.data.scale_range == [0.5, 2.0] and cfg.model.options["head"] == "aspp_s"


def test_missing_data_root_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"data.root is required for dataset 'voc12_aug': pass it on the command "
                                          r"line, e.g. data.root=/path/to/data"):
        load_config(ROOT / "configs" / "voc12_deeplabv2.yaml")
    with pytest.raises(ConfigError, match=r"data.root is required for dataset 'voc12_aug'"):
        load_config(None)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nme: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.nme'"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path, ["data.root=/data"])
    assert cfg.stage1.iterations or cfg.stage2.iterations
    assert not Path(cfg.out_dir).is_absolute() and (cfg.data.root == "/data" or cfg.data.dataset == "synthetic")


def test_voc_stage_configs_follow_the_paper():
    stage1 = load_config(ROOT / "configs" / "voc12_deeplabv2.yaml", ["data.root=/data"])
    assert stage1.model.name == "deeplabv2_resnet101_msc" and stage1.stage1.batch_size == 10
    assert (stage1.data.crop_size, stage1.stage1.iterations, stage1.stage1.lr) == (321, 20000, 2.5e-4)
    assert stage1.stage2.iterations == 0
    stage2 = load_config(ROOT / "configs" / "voc12_crfrnn.yaml", ["data.root=/data"])
    assert stage2.stage1.iterations == 0 and stage2.stage2.iterations > 0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SYNTHETIC, ["stage2.crf_lr=0.5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert to_dict(cfg)["stage2"]["crf_lr"] == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.mode=sliding", "eval.window=16", "eval.stride=17"], r"eval.stride=17 must be <= eval.window=16"),
        (["eval.mode=sliding", "eval.window=7", "eval.stride=7"], r"eval.window=7 is smaller than the 8 pixels"),
        (["data.dataset=folder", "data.root=/data", "model.num_classes=256",
          "data.folder.class_names=[" + ",".join(f"c{i}" for i in range(256)) + "]"],
         r"model.num_classes must be in \[1, 255\], got 256"),
    ],
)
def test_settings_that_depend_on_each_other(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SYNTHETIC, overrides)
    load_config(SYNTHETIC, ["eval.window=16", "eval.stride=17"])  # whole-image evaluation uses neither
