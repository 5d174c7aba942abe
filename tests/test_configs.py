"""Trainer configs: torch-free for the web, the same classes the trainers use, and a run's params checked against
them (unknown setting, wrong type, out of range: 422 naming the field) by the API and the runs form."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.errors import FieldError
from app.models import TrainingRun
from app.training.configs import (
    CONFIGS,
    PPOConfig,
    RMConfig,
    SFTConfig,
    config_for,
    ordered_fields,
    param_specs,
    validate_params,
)
from tests.test_run_readiness import ready_for_every_run

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = {
    "sft": "worker/train_sft.py",
    "rm": "worker/train_rm.py",
    "ppo": "worker/train_ppo.py",
    "dpo": "worker/train_dpo.py",
}
# Where a trainer's settings are read besides its own module: the memory options, and PPO's four networks.
HELPERS = {
    "sft": ["worker/adapters.py"],
    "rm": ["worker/adapters.py"],
    "ppo": ["worker/adapters.py", "worker/ppo_models.py"],
    "dpo": ["worker/adapters.py"],
}


# --- torch-free --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["app.training.configs", "app.main"])
def test_the_web_side_imports_neither_torch_nor_transformers(module):
    # A fresh interpreter: this test process has imported torch through the trainer tests long ago.
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'worker') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]", f"{module} pulled in {found.stdout.strip()}"


# --- the same classes the trainers use ---------------------------------------------------------------------


def used_settings(path: str) -> set[str]:
    """The `config.<name>` attributes a trainer module reads."""
    tree = ast.parse((ROOT / path).read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config"
    }


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_each_config_has_exactly_the_settings_its_trainer_reads(kind):
    import importlib

    trainer = importlib.import_module(TRAINERS[kind].removesuffix(".py").replace("/", "."))
    cls = CONFIGS[kind]
    assert getattr(trainer, cls.__name__) is cls  # re-exported: tests and bench import it from the trainer
    read = used_settings(TRAINERS[kind]).union(*(used_settings(path) for path in HELPERS[kind]))
    assert {f.name for f in fields(cls)} == read


def test_pretrain_settings_are_pretrain_base_arguments_and_ppo_schedules_its_schedules():
    from worker.train_ppo import LR_SCHEDULES
    from worker.world_model import pretrain_base

    arguments = inspect.signature(pretrain_base).parameters
    assert {f.name for f in fields(CONFIGS["pretrain"])} <= set(arguments)
    assert config_for("pretrain", {}).seed == arguments["seed"].default
    schedule = next(f for f in fields(PPOConfig) if f.name == "lr_schedule")
    assert set(schedule.metadata["choices"]) == set(LR_SCHEDULES)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_defaults_and_the_shipped_recipe_pass_their_own_limits(kind):
    from worker.modeling import load_recipe

    defaults = asdict(CONFIGS[kind]())
    assert validate_params(kind, defaults) == defaults
    recipe = load_recipe(ROOT / "models" / "world-base").get(kind, {})
    assert CONFIGS[kind](**validate_params(kind, recipe))  # the recipe names real settings with allowed values


def test_the_trainer_trains_with_a_validated_config(tmp_path):
    from tests.tiny_lm import one_torch_thread, save_tiny_model
    from worker.train_sft import train_sft

    threads = one_torch_thread()
    next(threads)
    try:
        base = save_tiny_model(tmp_path / "base")
        params = json.loads('{"epochs": 1, "learning_rate": 1, "batch_size": 2, "max_length": 64, "device": "cpu"}')
        config = SFTConfig(**validate_params("sft", params))
        assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
        config.learning_rate = 1e-2
        metrics = train_sft(
            base, [("Repeat red", "red red"), ("Repeat blue", "blue blue")] * 2, [], config, tmp_path / "out"
        )
    finally:
        next(threads, None)
    assert metrics["steps"] == 2 and metrics["epochs_run"] == 1


# --- what validation refuses -------------------------------------------------------------------------------


def just_outside(spec: dict) -> list:
    """Values one step past each limit of a numeric setting, and the limits themselves (which pass)."""
    step = 1 if spec["type"].startswith("int") else 1e-9
    outside, inside = [], []
    if "min" in spec:
        outside.append(spec["min"] - step)
        inside.append(spec["min"])
    if "max" in spec:
        outside.append(spec["max"] + step)
        inside.append(spec["max"])
    if "gt" in spec:
        outside.append(spec["gt"])
        inside.append(spec["gt"] + step)
    return [(value, False) for value in outside] + [(value, True) for value in inside]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_limit_is_enforced_at_its_edge(kind):
    for name, spec in param_specs(kind).items():
        for value, ok in just_outside(spec):
            if ok:
                assert validate_params(kind, {name: value}) == {name: value}
            else:
                with pytest.raises(FieldError) as caught:
                    validate_params(kind, {name: value})
                assert caught.value.field == f"params.{name}" and caught.value.status == 422
                assert spec["allowed"] in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("kind", "params", "field", "says"),
    [
        ("sft", {"lerning_rate": 0.1}, "params.lerning_rate", "sft has no such setting; known: epochs, learning_rate"),
        ("sft", {"epochs": "2"}, "params.epochs", 'must be an integer >= 1, got "2"'),
        ("sft", {"epochs": 2.0}, "params.epochs", "must be an integer >= 1, got 2.0"),
        ("sft", {"epochs": True}, "params.epochs", "must be an integer >= 1, got true"),
        ("sft", {"epochs": None}, "params.epochs", "must be an integer >= 1, got null"),
        ("sft", {"learning_rate": 0}, "params.learning_rate", "must be a number > 0, got 0"),
        ("sft", {"learning_rate": float("inf")}, "params.learning_rate", "must be a number > 0, got Infinity"),
        ("sft", {"warmup_ratio": 1.5}, "params.warmup_ratio", "must be a number between 0 and 1, got 1.5"),
        ("sft", {"early_stopping_patience": 0}, "params.early_stopping_patience", "an integer >= 1 or null, got 0"),
        ("rm", {"device": "gpu"}, "params.device", "must be one of 'cpu' or null, got \"gpu\""),
        ("rm", {"mixed_precision": "fp8"}, "params.mixed_precision", "must be one of 'no', 'bf16', 'fp16'"),
        ("ppo", {"kl_coef": -0.1}, "params.kl_coef", "must be a number >= 0, got -0.1"),
        ("ppo", {"adaptive_kl": 1}, "params.adaptive_kl", "must be true or false, got 1"),
        ("ppo", {"stop_at_newline": "yes"}, "params.stop_at_newline", "must be true, false or null"),
        ("ppo", {"lr_schedule": "linear"}, "params.lr_schedule", "must be one of 'constant', 'cosine'"),
        ("ppo", {"seed": -1}, "params.seed", "must be an integer between 0 and 4294967295, got -1"),
        ("pretrain", {"steps": 0}, "params.steps", "must be an integer >= 1 or null, got 0"),
        ("pretrain", {"epochs": 1}, "params.epochs", "pretrain has no such setting; known: steps, seed"),
        ("sample", {}, "kind", "must be one of pretrain, sft, rm, ppo"),
    ],
)
def test_validation_names_the_field_and_what_it_accepts(kind, params, field, says):
    with pytest.raises(FieldError) as caught:
        validate_params(kind, params)
    assert caught.value.field == field and caught.value.status == 422
    assert says in caught.value.message, caught.value.message


def test_the_worker_drops_settings_it_does_not_know_but_not_bad_values():
    # Params stored by an older version may name settings since removed; their values are still checked.
    assert config_for("rm", {"epochs": 2, "colour": "red"}) == RMConfig(epochs=2)
    with pytest.raises(FieldError, match=r"params\.epochs: must be an integer >= 1"):
        config_for("rm", {"epochs": 0, "colour": "red"})


# --- through the API and the runs form ---------------------------------------------------------------------


@pytest.mark.sqlite
def test_api_refuses_bad_params_naming_the_field(client, db, auth):
    for kind, params, field, says in [
        ("sft", {"epochs": 2, "lerning_rate": 0.1}, "params.lerning_rate", "sft has no such setting"),
        ("rm", {"learning_rate": "fast"}, "params.learning_rate", 'must be a number > 0, got "fast"'),
        ("ppo", {"warmup_ratio": 2}, "params.warmup_ratio", "must be a number between 0 and 1, got 2"),
        ("ppo", {"steps": 0}, "params.steps", "must be an integer >= 1, got 0"),
        ("pretrain", {"steps": -5}, "params.steps", "must be an integer >= 1 or null, got -5"),
    ]:
        response = client.post("/api/v1/runs", json={"kind": kind, "params": params}, headers=auth)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(f"{field}: {says}"), response.json()
    assert db.scalar(select(func.count()).select_from(TrainingRun)) == 0  # nothing queued


@pytest.mark.sqlite
def test_valid_params_round_trip(client, db, auth):
    ready_for_every_run(db)
    sent = {
        "sft": {
            "epochs": 2,
            "learning_rate": 1e-3,
            "warmup_ratio": 0,
            "early_stopping_patience": None,
            "device": "cpu",
            "mixed_precision": "bf16",
        },
        "ppo": {
            "steps": 1,
            "kl_coef": 0,
            "gamma": 1,
            "lr_schedule": "constant",
            "stop_at_newline": True,
            "missing_eos_penalty": 0.5,
        },
        "pretrain": {"steps": 10, "seed": 4294967295},
    }
    for kind, params in sent.items():
        started = client.post("/api/v1/runs", json={"kind": kind, "params": params}, headers=auth)
        assert started.status_code == 201, started.text
        stored = client.get(f"/api/v1/runs/{started.json()['id']}", headers=auth).json()["params"]
        assert stored == params  # JSON's 0 and 1.0 compare equal; a float setting is stored as a float
        config = config_for(kind, stored)
        assert {name: getattr(config, name) for name in params} == params
        if kind == "sft":
            assert isinstance(stored["warmup_ratio"], float) and isinstance(config.learning_rate, float)


def test_params_listing_comes_from_the_dataclasses(client, db, auth):
    listed = client.get("/api/v1/runs/params", headers=auth).json()
    assert set(listed) == {"sft", "rm", "ppo", "dpo", "pretrain"}
    for kind, specs in listed.items():
        assert list(specs) == [f.name for f in ordered_fields(CONFIGS[kind])]  # own settings first
        assert specs == json.loads(json.dumps(param_specs(kind)))
    assert listed["rm"]["learning_rate"] == {
        "type": "float",
        "default": 9e-6,
        "gt": 0,
        "allowed": "a number > 0",
        "help": "Peak AdamW learning rate (InstructGPT 6B RM: 9e-6).",
    }
    assert listed["sft"]["early_stopping_patience"]["type"] == "int | None"
    assert listed["ppo"]["lr_schedule"]["choices"] == ["constant", "cosine"]


def test_runs_form_refuses_an_out_of_range_setting_and_lists_the_limits(client, db, admin, login):
    csrf = login(admin.username)
    page = client.get("/admin/runs").text
    assert "<code>warmup_ratio</code></th><td>a number between 0 and 1</td>" in page
    typed = '{"epochs": 2, "warmup_ratio": 1.5}'
    bad = client.post("/admin/runs", data={"csrf_token": csrf, "kind": "sft", "params": typed})
    assert bad.status_code == 422
    assert "params.warmup_ratio: must be a number between 0 and 1, got 1.5" in bad.text
    assert typed.replace('"', "&#34;") in bad.text  # the form keeps what was typed
    assert db.scalar(select(func.count()).select_from(TrainingRun)) == 0
