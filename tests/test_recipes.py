import math
import shutil
from pathlib import Path

import pytest
import tomllib

from gradcheck_cli import recipes
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import ExitCode, UsageError
from gradcheck_cli.recipes import bundled_recipes_dir, list_bundled_recipes, load_recipe

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ["exploding_rnn", "nan_at_step", "tiny_gan", "tiny_lm", "tiny_lm_grid"]
# The keys load_recipe returns for SweepConfig.from_values.
RECIPE_VALUES = {
    "script",
    "max_norms",
    "norm_types",
    "steps",
    "seed",
    "seeds",
    "lr",
    "divergence_factor",
    "device",
    "amp",
    "accumulate",
    "amp_init_scale",
}


def recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    (tmp_path / "model.py").write_text("# a script\n")
    path = tmp_path / name
    path.write_text(text)
    return path


# --- bundled recipes ----------------------------------------------------------------------------


def test_bundled_recipes_are_listed_with_descriptions():
    assert bundled_recipes_dir() == REPO / "recipes"
    listed = list_bundled_recipes()
    assert [name for name, _, _ in listed] == BUNDLED
    for name, description, path in listed:
        assert description and path == REPO / "recipes" / f"{name}.toml"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_makes_a_valid_sweep_config(name):
    values = load_recipe(name)
    script = {"tiny_lm_grid": "tiny_lm"}.get(name, name)  # a second recipe for the same sample
    assert values["script"] == (REPO / "sample_models" / f"{script}.py").resolve()
    assert values["script"].is_file()
    config = SweepConfig.from_values({k: v for k, v in values.items() if k in RECIPE_VALUES})
    assert config.steps >= 1 and config.device == "cpu"
    assert isinstance(values["fail_on_nan"], bool) and isinstance(values["fail_on_divergence"], bool)
    assert set(values) <= RECIPE_VALUES | {"fail_on_nan", "fail_on_divergence"}


def test_exploding_rnn_recipe_values():
    values = load_recipe("exploding_rnn")
    assert values["max_norms"] == (0.1, 1.0, 10.0)
    assert values["norm_types"] == (2.0, math.inf)
    assert (values["steps"], values["seed"], values["lr"], values["divergence_factor"]) == (100, 0, (0.01,), 10.0)


def test_name_with_suffix_path_and_relative_path(monkeypatch):
    by_name = load_recipe("nan_at_step")
    assert load_recipe("nan_at_step.toml") == by_name
    assert load_recipe(REPO / "recipes" / "nan_at_step.toml") == by_name
    monkeypatch.chdir(REPO / "sample_models")  # a relative path is taken from the current directory
    assert load_recipe("../recipes/nan_at_step.toml") == by_name


def test_a_file_in_the_current_directory_wins_over_a_bundled_name(tmp_path, monkeypatch):
    recipe(tmp_path, 'script = "model.py"\nsteps = 3\n', name="tiny_lm")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny_lm") == {"script": (tmp_path / "model.py").resolve(), "steps": 3}


def test_installed_wheel_layout(tmp_path, monkeypatch):
    """In a wheel, recipes/ and sample_models/ sit inside the package (pyproject force-include)."""
    package = tmp_path / "site-packages" / "gradcheck_cli"
    shutil.copytree(REPO / "recipes", package / "recipes")
    shutil.copytree(REPO / "sample_models", package / "sample_models")
    monkeypatch.setattr(recipes, "__file__", str(package / "recipes.py"))
    assert bundled_recipes_dir() == package / "recipes"
    assert [p for _, _, p in list_bundled_recipes()] == [package / "recipes" / f"{n}.toml" for n in BUNDLED]
    assert load_recipe("exploding_rnn")["script"] == (package / "sample_models" / "exploding_rnn.py").resolve()


def test_pyproject_ships_recipes_and_samples_inside_the_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {"recipes": "gradcheck_cli/recipes", "sample_models": "gradcheck_cli/sample_models"}


# --- values -------------------------------------------------------------------------------------


def test_only_present_keys_and_alternative_spellings(tmp_path):
    path = recipe(tmp_path, 'script = "model.py"\nmax_norm = "0.5, 2"\nnorm_type = "1,inf"\n')
    assert load_recipe(path) == {
        "script": (tmp_path / "model.py").resolve(),
        "max_norms": (0.5, 2.0),
        "norm_types": (1.0, math.inf),
    }
    path = recipe(tmp_path, 'norm_type = [2, inf, "inf", 1]\nmax_norm = [1, 0.25]\nlr = 1\n')
    assert load_recipe(path) == {"norm_types": (2.0, math.inf, 1.0), "max_norms": (1.0, 0.25), "lr": (1.0,)}
    path = recipe(tmp_path, 'lr = "0.1, 1"\nseeds = [0, 2, 0]\namp = "fp16"\naccumulate = 4\namp_init_scale = 1024\n')
    assert load_recipe(path) == {
        "lr": (0.1, 1.0),
        "seeds": (0, 2),
        "amp": "fp16",
        "accumulate": 4,
        "amp_init_scale": 1024.0,
    }
    assert load_recipe(recipe(tmp_path, "")) == {}


def test_script_is_relative_to_the_recipe_not_the_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (tmp_path / "model.py").write_text("")
    (sub / "r.toml").write_text('script = "../model.py"\n')
    monkeypatch.chdir(sub)
    assert load_recipe(sub / "r.toml")["script"] == (tmp_path / "model.py").resolve()


# --- errors -------------------------------------------------------------------------------------


def test_missing_recipe_lists_the_bundled_ones(tmp_path):
    with pytest.raises(UsageError) as err:
        load_recipe("no_such_recipe")
    assert err.value.exit_code == ExitCode.USAGE
    assert "'no_such_recipe' does not exist" in err.value.message
    assert all(name in err.value.hint for name in BUNDLED)
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="is not a file"):
        load_recipe(tmp_path)


def test_invalid_toml_names_file_and_line(tmp_path):
    path = recipe(tmp_path, 'script = "model.py"\nsteps = 100\nlr = 0.01.2\n')
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    assert str(path) in err.value.message and "not valid TOML" in err.value.message
    assert "line 3" in err.value.message


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'description = "\xff"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        load_recipe(path)


def test_unknown_keys_are_listed_with_the_allowed_ones(tmp_path):
    path = recipe(tmp_path, 'script = "model.py"\nmax_norms = [1]\nlearning_rate = 0.1\n')
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    assert "unknown keys: learning_rate, max_norms" in err.value.message
    assert str(path) in err.value.message
    assert "max_norm" in err.value.hint and "fail_on_divergence" in err.value.hint


@pytest.mark.parametrize(
    "line, key, expected, got",
    [
        ("description = 3", "description", "a string", "int"),
        ("script = 3", "script", "a string", "int"),
        ("max_norm = 1.0", "max_norm", "a list of numbers", "float"),
        ('max_norm = [1, "x"]', "max_norm", "a list of numbers", "a list (int, str)"),
        ("max_norm = [true]", "max_norm", "a list of numbers", "a list (bool)"),
        ("norm_type = 2", "norm_type", 'a list of numbers or "inf"', "int"),
        ("norm_type = [[2]]", "norm_type", 'a list of numbers or "inf"', "a list (list)"),
        ("steps = 10.0", "steps", "an integer", "float"),
        ('steps = "10"', "steps", "an integer", "str"),
        ("steps = true", "steps", "an integer", "bool"),
        ("seed = 1.5", "seed", "an integer", "float"),
        ("lr = [true]", "lr", "a number, a list of numbers", "a list (bool)"),
        ("lr = true", "lr", "a number", "bool"),
        ("seeds = [1.5]", "seeds", "a list of integers", "a list (float)"),
        ("amp = true", "amp", "a string", "bool"),
        ("accumulate = 2.0", "accumulate", "an integer", "float"),
        ("divergence_factor = [10]", "divergence_factor", "a number", "a list (int)"),
        ("device = 0", "device", "a string", "int"),
        ('fail_on_nan = "yes"', "fail_on_nan", "a boolean", "str"),
        ("fail_on_divergence = 1", "fail_on_divergence", "a boolean", "int"),
    ],
)
def test_wrong_types_name_key_expected_and_got(tmp_path, line, key, expected, got):
    path = recipe(tmp_path, line + "\n")
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    message = err.value.message
    assert str(path) in message
    assert f"'{key}' must be {expected}" in message
    assert f"got {got}" in message


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("max_norm = [0]", "max_norm value 0 must be a positive finite number"),
        ("max_norm = [1, inf]", "must be a positive finite number"),
        ("max_norm = []", "has an empty entry"),
        ('max_norm = "1,,2"', "has an empty entry"),
        ('norm_type = ["two"]', "norm_type value 'two' is not a number or 'inf'"),
        ("norm_type = [nan]", "is not a valid norm type"),
        ("steps = 0", "steps 0 must be a whole number of at least 1"),
        ("lr = -0.1", "lr -0.1 must be a positive finite number"),
        ("lr = [0.1, 0]", "lr 0 must be a positive finite number"),
        ("seeds = [-1]", "seeds -1 must be a whole number"),
        ('amp = "fp8"', "amp 'fp8' is not a precision mode"),
        ("accumulate = 0", "accumulate 0 must be a whole number of at least 1"),
        ("divergence_factor = 0", "divergence_factor 0 must be a positive finite number"),
        ('device = "tpu"', "device 'tpu' is not supported"),
        ('script = "nope.py"', "script 'nope.py' does not exist"),
    ],
)
def test_out_of_range_values(tmp_path, line, fragment):
    path = recipe(tmp_path, line + "\n")
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    assert str(path) in err.value.message
    assert fragment in err.value.message
    assert err.value.hint


def test_parsing_never_executes_code(tmp_path):
    """A recipe is data: reading it (and validating the sweep it describes) never imports its
    script. The script here leaves a marker file when imported; the last step imports it on
    purpose, to show the marker would have appeared."""
    marker = tmp_path / "executed"
    (tmp_path / "model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "import torch\n"
        "def build_model():\n    return torch.nn.Linear(1, 1)\n"
        "def batches():\n    return [torch.ones(1, 1)]\n"
        "def loss_fn(model, batch):\n    return model(batch).sum()\n"
    )
    path = tmp_path / "r.toml"
    path.write_text(
        f"description = \"__import__('pathlib').Path('{marker}').touch()\"\nscript = \"model.py\"\nsteps = 2\n"
    )
    values = load_recipe(path)
    assert values["script"] == tmp_path / "model.py" and values["steps"] == 2
    config = SweepConfig.from_values(values)
    assert config.script == tmp_path / "model.py"
    assert not marker.exists()

    from gradcheck_cli.loader import load_experiment

    load_experiment(config.script)
    assert marker.exists()
