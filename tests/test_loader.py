import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradcheck_cli.errors import ExitCode, UsageError, UserCodeError
from gradcheck_cli.loader import Experiment, format_user_traceback, load_experiment

SCRIPTS = Path(__file__).parent / "scripts"


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_loads_contract_functions():
    exp = load_experiment(SCRIPTS / "stable_linear.py")
    assert isinstance(exp, Experiment)
    assert exp.path == (SCRIPTS / "stable_linear.py").resolve()
    assert exp.name == "stable_linear.py"
    assert callable(exp.build_model_fn) and callable(exp.batches_fn) and callable(exp.loss_fn)
    assert exp.build_optimizer_fn is None and not exp.has_optimizer
    assert isinstance(exp.build_model(), torch.nn.Linear)


def test_optional_build_optimizer_is_picked_up():
    exp = load_experiment(SCRIPTS / "with_optimizer.py")
    assert exp.has_optimizer
    assert isinstance(exp.build_optimizer_fn(exp.build_model()), torch.optim.Adam)


def test_main_block_does_not_run():
    # stable_linear.py raises SystemExit in its __main__ block
    exp = load_experiment(SCRIPTS / "stable_linear.py")
    assert exp.module.__name__ != "__main__"
    assert exp.module.__file__ == str((SCRIPTS / "stable_linear.py").resolve())


def test_each_load_gets_a_unique_module():
    a = load_experiment(SCRIPTS / "stable_linear.py")
    b = load_experiment(SCRIPTS / "stable_linear.py")
    assert a.module is not b.module
    assert a.module.__name__ != b.module.__name__
    assert sys.modules[a.module.__name__] is a.module


def test_script_can_import_siblings_and_sys_path_is_restored():
    before = list(sys.path)
    exp = load_experiment(SCRIPTS / "stable_linear.py")  # imports data_helper beside it
    assert exp.module.X.shape == (32, 3)
    assert sys.path == before


def test_missing_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_experiment(tmp_path / "nope.py")


def test_syntax_error_names_file_line_and_text():
    with pytest.raises(UsageError) as info:
        load_experiment(SCRIPTS / "syntax_error.py")
    err = info.value
    assert err.exit_code == ExitCode.USAGE
    assert "syntax_error.py, line 4" in err.message
    assert "def build_model(:" in err.message
    assert err.hint


def test_syntax_error_in_imported_sibling_names_the_sibling(tmp_path):
    write(tmp_path, "broken_helper.py", "x = (1,\n")
    script = write(tmp_path, "main_script.py", "import broken_helper\n")
    with pytest.raises(UsageError) as info:
        load_experiment(script)
    assert "broken_helper.py, line 1" in info.value.message


def test_contract_problems_are_reported_all_at_once():
    with pytest.raises(UsageError) as info:
        load_experiment(SCRIPTS / "missing_functions.py")
    msg = info.value.message
    assert "missing_functions.py" in msg
    assert "build_model is missing" in msg
    assert "batches is not callable (it is list)" in msg
    assert "loss_fn(batch) must accept two arguments (model, batch)" in msg
    assert "build_optimizer is not callable (it is str)" in msg
    hint = info.value.hint
    for example in (
        "def build_model():",
        "def batches():",
        "def loss_fn(model, batch):",
        "def build_optimizer(model):",
    ):
        assert example in hint


def test_only_missing_names_are_listed(tmp_path):
    script = write(
        tmp_path,
        "partial.py",
        """
        def build_model():
            pass
        """,
    )
    with pytest.raises(UsageError) as info:
        load_experiment(script)
    msg = info.value.message
    assert "batches is missing" in msg and "loss_fn is missing" in msg
    assert "build_model" not in msg
    assert "build_optimizer" not in msg  # optional


def test_flexible_signatures_are_accepted(tmp_path):
    script = write(
        tmp_path,
        "flexible.py",
        """
        import torch
        def build_model(width=2):
            return torch.nn.Linear(width, 1)
        def batches(*args):
            return [torch.ones(1, 2)]
        def loss_fn(model, batch, scale=1.0):
            return model(batch).sum() * scale
        build_optimizer = lambda model, **kw: torch.optim.SGD(model.parameters(), lr=0.1)
        """,
    )
    exp = load_experiment(script)
    assert exp.has_optimizer


def test_exception_at_import_is_user_code_error_with_trimmed_traceback():
    script = SCRIPTS / "raises_at_import.py"
    names_before = set(sys.modules)
    with pytest.raises(UserCodeError) as info:
        load_experiment(script)
    err = info.value
    assert err.exit_code == ExitCode.USER_CODE
    assert "ValueError: config file is missing" in err.message
    tb = err.user_traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert f'File "{script.resolve()}", line 5, in <module>' in tb
    assert f'File "{script.resolve()}", line 2, in load_config' in tb
    assert tb.rstrip().endswith("ValueError: config file is missing")
    assert "gradcheck_cli" not in tb and "importlib" not in tb
    # the half-imported module does not linger
    assert not any(n.startswith("gradcheck_cli.user_scripts.raises_at_import") for n in set(sys.modules) - names_before)


def test_system_exit_at_import_is_user_code_error(tmp_path):
    script = write(tmp_path, "exits.py", "import sys\nsys.exit('no args given')\n")
    with pytest.raises(UserCodeError, match="SystemExit: no args given"):
        load_experiment(script)


def test_keyboard_interrupt_at_import_propagates(tmp_path):
    script = write(tmp_path, "ctrl_c.py", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_experiment(script)


def test_build_model_returning_none_is_usage_error():
    exp = load_experiment(SCRIPTS / "bad_model.py")
    with pytest.raises(
        UsageError, match=r"build_model\(\) in bad_model.py returned NoneType, expected a torch.nn.Module"
    ):
        exp.build_model()


def test_build_model_without_trainable_parameters_is_usage_error(tmp_path):
    script = write(
        tmp_path,
        "frozen.py",
        """
        import torch
        def build_model():
            m = torch.nn.Linear(2, 1)
            m.requires_grad_(False)
            return m
        def batches():
            return []
        def loss_fn(model, batch):
            return batch
        """,
    )
    with pytest.raises(UsageError, match="no trainable parameters"):
        load_experiment(script).build_model()


def test_build_model_raising_is_user_code_error_pointing_at_the_line():
    script = SCRIPTS / "raises_in_build_model.py"
    exp = load_experiment(script)
    with pytest.raises(UserCodeError) as info:
        exp.build_model()
    err = info.value
    assert "TypeError" in err.message and "bais" in err.message
    assert f'File "{script.resolve()}", line 5, in build_model' in err.user_traceback
    assert "torch/nn" not in err.user_traceback and "gradcheck_cli" not in err.user_traceback


def test_keyboard_interrupt_in_build_model_propagates(tmp_path):
    script = write(
        tmp_path,
        "ctrl_c_model.py",
        """
        def build_model():
            raise KeyboardInterrupt
        def batches():
            return []
        def loss_fn(model, batch):
            return batch
        """,
    )
    with pytest.raises(KeyboardInterrupt):
        load_experiment(script).build_model()


def test_format_user_traceback_keeps_only_the_users_frames(tmp_path):
    script = write(
        tmp_path,
        "user_code.py",
        """
        import torch
        def inner():
            return torch.nn.Linear(2, 3)(torch.zeros(3))
        def outer():
            return inner()
        """,
    )
    exp_module = load_experiment_module(script)
    try:
        exp_module.outer()
    except RuntimeError as exc:
        text = format_user_traceback(exc, script)
    assert "in outer" in text and "in inner" in text
    assert "torch" + os.sep + "nn" not in text  # torch's own frames (module.py, linear.py) are trimmed
    assert text.splitlines()[-1].startswith("RuntimeError:")


def test_format_user_traceback_trims_chained_exceptions(tmp_path):
    script = write(
        tmp_path,
        "chained.py",
        """
        def load():
            try:
                {}["key"]
            except KeyError as exc:
                raise ValueError("could not load") from exc
        """,
    )
    module = load_experiment_module(script)
    try:
        module.load()
    except ValueError as exc:
        text = format_user_traceback(exc, script)
    assert "KeyError: 'key'" in text
    assert "direct cause" in text
    assert text.rstrip().endswith("ValueError: could not load")
    assert text.count("chained.py") == 2  # the user's frame in both exceptions of the chain


def test_format_user_traceback_falls_back_to_non_internal_frames(tmp_path):
    try:
        torch.zeros(2) @ torch.zeros(3)
    except RuntimeError as exc:
        text = format_user_traceback(exc, tmp_path / "elsewhere.py")
    assert "test_loader.py" in text  # no frame is the user's: keep what is not gradclip's


def load_experiment_module(path: Path):
    """Import a helper file that is not a full script (the contract check would reject it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"helper_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
