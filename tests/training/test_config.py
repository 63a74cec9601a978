"""The config schema: defaults, YAML overrides, command-line overrides, and clear errors."""

import re
from pathlib import Path

import pytest
import yaml

from crfrnn_deeplab.training.config import Config, ConfigError, config_from_dict, load_config, resolve_config
from crfrnn_deeplab.training.config import apply_overrides, read_config, save_config, to_dict

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
    bad.write_text("- a list\n")  # was "expected a mapping at the top level, got ListConfig": see the test below
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: cannot be read as a config, a YAML mapping of config "
                                                    f"keys (such as 'seed: 0'): its top level is a list (1 item)")):
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


# ---- an item of a list by index: data.scale_range[0]=0.4 (was "expected a list of float, got dict {'0': 0.4}")


def test_an_index_sets_one_item_of_a_list():
    cfg = load_config(SYNTHETIC, ["data.scale_range[0]=0.4", "grid_search.theta_betas[1]=5",
                                  "grid_search.theta_alphas[-1]=60", "grid_search.bilateral_weights[-7]=15"])
    assert cfg.data.scale_range == [0.4, 1.5] and cfg.grid_search.theta_betas == [5.0, 5.0, 20.0, 30.0]
    assert cfg.grid_search.theta_alphas == [5.0, 10.0, 20.0, 40.0, 60.0]  # -1: the last item
    assert cfg.grid_search.bilateral_weights == [15.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]  # -7: the first
    assert all(isinstance(v, float) for v in cfg.data.scale_range + cfg.grid_search.theta_betas)
    # the list as the overrides before left it; an item of a text list keeps the text; a list inside an option
    cfg = apply_overrides(Config(), ["data.folder.class_names=[sky, road]", "data.folder.class_names[1]=2012",
                                     "model.options.scales=[[1, 2], 3]", "model.options.scales[0][-1]=7"])
    assert cfg.data.folder.class_names == ["sky", "2012"] and cfg.model.options == {"scales": [[1, 7], 3]}
    cfg = load_config(SYNTHETIC, ["grid_search.theta_betas=${grid_search.theta_alphas}", "grid_search.theta_betas[0]=1"])
    assert cfg.grid_search.theta_betas == [1.0, 10.0, 20.0, 40.0, 80.0]  # an interpolated list: its items, one set


@pytest.mark.parametrize("overrides, message", [
    (["data.scale_range[2]=1"], r"data.scale_range[2]: index 2 is out of range: data.scale_range has 2 items (indices 0 "
                                r"to 1, or -2 to -1 from the end); to change its length, give the whole list "
                                r"(data.scale_range=[...])"),
    (["data.scale_range[-3]=1"], r"data.scale_range[-3]: index -3 is out of range: data.scale_range has 2 items "),
    (["grid_search.theta_betas=[4]", "grid_search.theta_betas[1]=5"],
     r"grid_search.theta_betas[1]: index 1 is out of range: grid_search.theta_betas has 1 item (indices 0 to 0, or "
     r"-1 to -1 from the end)"),
    (["grid_search.theta_betas=[]", "grid_search.theta_betas[0]=5"],
     r"grid_search.theta_betas[0]: index 0 is out of range: grid_search.theta_betas is empty; to change its length, "
     r"give the whole list (grid_search.theta_betas=[...])"),
    # an index on a key that holds no list
    (["seed[0]=1"], r"seed[0]: seed is int, not a list, so it has no item [0]"),
    (["model.init_from[0]=w.pt"], r"model.init_from[0]: model.init_from is str or null, not a list, so it has no "
                                  r"item [0]"),
    (["crf[1]=1"], r"crf[1]: crf is a mapping of spatial_weight, bilateral_weight, theta_alpha, theta_beta, "),
    (["model.options[0]=1"], r"model.options[0]: model.options is a mapping, not a list, so it has no item [0]"),
    (["model.options.norm[0]=group"], r"model.options.norm[0]: model.options.norm is str 'batch', not a list, so it "
                                      r"has no item [0]"),
    (["data.scale_range[0][1]=1"], r"data.scale_range[0][1]: data.scale_range[0] is float, not a list, so it has no "
                                   r"item [1]"),
    (["seed.x[0]=1"], r"seed.x[0]: seed is int, not a mapping, so it has no key 'x'"),  # was a bare TypeError
    (["stage1.lrs[0]=1"], r"unknown config key 'stage1.lrs'; known keys here: iterations, batch_size"),
    (["model.options.scales[0]=1"], r"model.options.scales[0]: model.options.scales is not set, so it has no item "
                                    r"to replace; give the whole list (model.options.scales=[...])"),
    # the item's value is checked like the list's
    (["data.scale_range[0]=x"], r"data.scale_range[0]: expected float, got str 'x'"),
    (["data.scale_range[1]={}"], r"data.scale_range[1]: expected float, got dict {}"),
    (["data.scale_range[0]=[1]"], r"data.scale_range[0]: expected float, got list [1]"),
    (["data.scale_range[0]=9"], r"data.scale_range: expected [min, max] with 0.1 <= min <= max <= 8, got [9.0, 1.5]"),
    (["grid_search.theta_betas[0]=.nan"], r"grid_search.theta_betas[0] must be a finite number, got nan"),
])
def test_an_index_that_sets_no_item_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(SYNTHETIC, overrides)


def test_an_index_override_is_blamed_like_an_override_of_its_list(tmp_path):
    # an override of data.scale_range[i] sets data.scale_range: a bad list the file gives, the override can fix; a
    # bad list the override makes is not the file's; a bad value of another key stays the file's
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  dataset: synthetic\n  scale_range: [0.6, 9]\nmodel:\n  num_classes: 6\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: data.scale_range: expected [min, max]")):
        load_config(path)
    assert load_config(path, ["data.scale_range[1]=1.4"]).data.scale_range == [0.6, 1.4]
    with pytest.raises(ConfigError, match=r"^data.scale_range: expected \[min, max\] .*, got \[0.7, 9.0\]$"):
        load_config(path, ["data.scale_range[0]=0.7"])  # the override changed the list (and left it bad)
    path.write_text("data:\n  dataset: synthetic\n  scale_range: [0.6, 1.4]\nmodel:\n  num_classes: 6\n")
    with pytest.raises(ConfigError, match=r"^data.scale_range: expected \[min, max\] .*, got \[2.0, 1.4\]$"):
        load_config(path, ["data.scale_range[0]=2"])  # valid as the file gives it: the override made it bad
    path.write_text("data:\n  dataset: synthetic\nmodel:\n  num_classes: 6\nstage1:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: stage1.lr must be a finite number, got nan")):
        load_config(path, ["data.scale_range[0]=0.6"])


# ---- an interpolation that resolves to a value of the wrong shape names the key (was "config: Invalid type
# assigned: int is not a subclass of CRFConfig. value: 0")


@pytest.mark.parametrize("override, message", [
    ("crf=${seed}", "crf: expected a mapping of spatial_weight, bilateral_weight, theta_alpha, theta_beta, theta_gamma, "
                    "normalization, bilateral_filter, train_iterations, eval_iterations, learn_kernel_weights, "
                    "learn_compatibility, learn_bandwidths, got int 0 (the value of ${seed})"),
    ("stage1=${log_every}", "stage1: expected a mapping of iterations, batch_size, accumulate, lr, crf_lr, momentum, "
                            "weight_decay, poly_power, network_loss_weight, max_grad_norm, eval_every, "
                            "checkpoint_every, got int 20 (the value of ${log_every})"),
    ("data.scale_range=${seed}", "data.scale_range: expected a list of float, got int 0 (the value of ${seed})"),
    ("model.options=${seed}", "model.options: expected a mapping, got int 0 (the value of ${seed})"),  # "Cannot assign"
    ("data.folder=${data.scale_range}", "data.folder: expected a mapping of class_names, image_dir, mask_dir, "
                                        "train_split, val_split, mask_suffix, reduce_zero_label, got list [0.5, 1.5] "
                                        "(the value of ${data.scale_range})"),
    ("model.init_from=${grid_search.theta_betas}", "model.init_from: expected str or null, got list [5.0, 10.0, 20.0, "
                                                   "30.0] (the value of ${grid_search.theta_betas})"),
    # another section: was "config: Invalid type assigned: ModelConfig is not a subclass of DataConfig"
    ("data=${model}", "data: expected a mapping of dataset, root, crop_size, scale_range, hflip_prob, workers, "
                      "image_size, train_images, val_images, check_files, folder, got a mapping with the keys "
                      "['init_from', 'init_layout', 'name', 'num_classes', 'options'] (the value of ${model})"),
])
def test_an_interpolation_of_the_wrong_shape_names_the_key(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        load_config(SYNTHETIC, [override])
    assert load_config(SYNTHETIC, ["stage1=${stage2}"]).stage1 == load_config(SYNTHETIC).stage2  # a section alike


def test_an_interpolation_of_the_wrong_shape_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("grid_search:\n  theta_betas: ${seed}\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: grid_search.theta_betas: expected a list of float, "
                                                          f"got int 0 (the value of ${{seed}})") + "$"):
        load_config(path)


# ---- a file whose top level is not a mapping of config keys


@pytest.mark.parametrize("text, top", [
    ("hello\n", "str 'hello'"),  # was "unknown config key 'hello'"
    ("'stage1: {lr: 0.1}'\n", "str 'stage1: {lr: 0.1}'"),  # a quoted text: was read as the mapping it spells
    ("5\n", "int 5"),  # was "(Invalid loaded object type: int)"
    ("true\n", "bool True"),
    ("- stage1.lr=0.1\n- seed=3\n", "a list (2 items)"),  # was "expected a mapping at the top level, got ListConfig"
    ("A text file of notes, which YAML reads as one long plain scalar\nover two lines\n",
     "str 'A text file of notes, which YAML reads as one long plai..."),
])
def test_a_file_whose_top_level_is_not_a_mapping_names_the_file(tmp_path, text, top):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: cannot be read as a config, a YAML mapping of "
                                                          f"config keys (such as 'seed: 0'): its top level is {top}") + "$"):
        load_config(path)


def test_a_set_at_the_top_level_names_the_file(tmp_path):
    # YAML composes "!!set" as a mapping node; OmegaConf then refused it with an OSError that train.py showed as a
    # traceback
    path = tmp_path / "exp.yaml"
    path.write_text("!!set {a, b}\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: cannot be read as a config, a YAML mapping of "
                                                          "config keys (Invalid loaded object type: set)")):
        load_config(path)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "null\n", "~\n", "---\n"])
def test_an_empty_file_sets_nothing(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert read_config(path) == Config()
    overrides = ["data.dataset=synthetic", "model.num_classes=6"]
    assert load_config(path, overrides) == load_config(None, overrides)


def test_a_file_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04\x80\xff binary")  # was a raw UnicodeDecodeError
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: cannot be read as a config, a YAML mapping of "
                                                          f"config keys: it is not UTF-8 text (")):
        load_config(path)


def test_read_config_does_not_check_the_machine(tmp_path):
    # a run's saved config names the device it ran on: read, it is what the file says; loaded to run, it is checked
    path = save_config(load_config(SYNTHETIC, ["device=cpu"]), tmp_path / "config.yaml")
    path.write_text(path.read_text().replace("device: cpu", "device: cuda:99"))
    assert read_config(path).device == "cuda:99"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: device=cuda:99: ")):
        load_config(path)
