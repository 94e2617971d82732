import json

import pytest

from undertow.cli import main, split_overrides
from undertow.configtools import ConfigError
from undertow.pretrain.config import available_recipes, load_config


def test_default_recipe_is_tiny_and_valid():
    cfg = load_config()
    assert cfg.name == "tiny" and cfg.family == "transformer"
    assert "tiny" in available_recipes()


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["--model.d_model", "64", "--training.steps=50", "--data.weights", "1.0",
                               "--training.compile", "true", "--optimizer.betas", "0.8,0.9"])
    assert cfg.model.d_model == 64 and isinstance(cfg.model.d_model, int)
    assert cfg.training.steps == 50 and cfg.training.compile is True
    assert cfg.data.weights == [1.0] and cfg.optimizer.betas == [0.8, 0.9]


def test_recipe_from_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\nfamily = "transformer"\nd_model = 32\nn_heads = 2\n[training]\nsteps = 200\n')
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.model.d_model == 32 and cfg.training.steps == 200


@pytest.mark.parametrize(
    "override, words",
    [
        (["--model.n_heads", "3"], ["model.n_heads", "3", "valid"]),
        (["--model.n_kv_heads", "3"], ["model.n_kv_heads", "valid: [1, 2, 4]"]),
        (["--training.steps", "abc"], ["training.steps", "'abc'", "integer"]),
        (["--schedule.kind", "linear"], ["schedule.kind", "'linear'", "cosine", "wsd"]),
        (["--model.widht", "3"], ["unknown field", "widht", "d_model"]),
        (["--data.val_fraction", "1.5"], ["data.val_fraction", "1.5", "[0, 1)"]),
        (["--model.family", "rwkv"], ["model.family", "rwkv", "transformer"]),
        (["--parallel.tp", "0"], ["parallel.tp", "0", "integer >= 1"]),
        (["--data.weights", "1,2"], ["data.weights", "one weight per source"]),
        (["--checkpoint.resume", "/nonexistent/ckpt"], ["checkpoint.resume", "auto, none"]),
    ],
)
def test_validation_errors_name_field_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", override)
    for word in words:
        assert word in str(err.value)


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-recipe")


def test_cli_print_config(capsys):
    assert main(["pretrain", "--model.d_model", "96", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["d_model"] == 96 and printed["model"]["family"] == "transformer"


def test_cli_config_error_exit_code(capsys):
    assert main(["pretrain", "--training.steps", "0", "--print-config"]) == 2
    assert "training.steps = 0" in capsys.readouterr().err


def test_cli_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for name in ("--training.steps", "--model.d_model", "--checkpoint.resume", "--data.sources", "--schedule.kind"):
        assert name in out


def test_split_overrides_keeps_positional_recipe():
    plain, over = split_overrides(["pretrain", "tiny", "--model.d_model", "8", "--print-config", "--a.b=1"])
    assert plain == ["pretrain", "tiny", "--print-config"]
    assert over == ["--model.d_model", "8", "--a.b=1"]


def test_cli_resume_flag_sets_checkpoint_resume(capsys):
    assert main(["pretrain", "--resume", "none", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["resume"] == "none"


def test_cli_name_flag_and_literal_choices_in_help(capsys):
    assert main(["pretrain", "--name", "exp1", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "exp1"
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "{cosine|wsd|constant}" in capsys.readouterr().out


def test_a_short_trial_clamps_the_recipes_warmup_with_one_warning(caplog):
    cfg = load_config("tiny-mamba2", ["--training.steps", "3", "--schedule.warmup_steps", "30"])
    assert cfg.schedule.warmup_steps == 3
    assert any("warming up over all 3 steps" in r.getMessage() for r in caplog.records)


def test_help_of_a_recipe_shows_its_values(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "tiny-mamba2", "--help"])
    out = capsys.readouterr().out
    assert "values of recipe 'tiny-mamba2'" in out and "--data.seq_len INT  (value 128)" in out
    assert "--model.layer_pattern STR  (value 'MMMM')" in out and "model fields of family 'transformer'" not in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "(default 256)" in capsys.readouterr().out  # no recipe: the schema's defaults
    assert main(["pretrain", "no-such-recipe", "--help"]) == 2
