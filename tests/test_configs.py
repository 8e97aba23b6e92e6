"""Every YAML file under configs/ loads and is well-formed for its group."""

import pytest

from mup import _configs

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in sorted(_configs.config_dir().iterdir())
    if group.is_dir()
}
ALL = [(group, name) for group, names in GROUPS.items() for name in names]


def test_config_groups_exist():
    assert {"models", "probes"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "name"), ALL, ids=[f"{g}/{n}" for g, n in ALL])
def test_config_loads(group, name):
    data = _configs.load_config(group, f"{name}.yaml")
    assert data, f"configs/{group}/{name}.yaml is empty"


@pytest.mark.parametrize("name", GROUPS.get("models", []))
def test_model_config(name):
    data = _configs.load_config("models", f"{name}.yaml")
    assert data["name"] == name
    assert isinstance(data["layer"], int) and data["layer"] >= 0
    assert data["dtype"] in ("float32", "bfloat16", "float16")
    assert isinstance(data["spec"], str) and data["spec"]


@pytest.mark.parametrize("name", GROUPS.get("probes", []))
def test_probe_config(name):
    from mup import probes

    config = probes.default_config(name)
    assert config is not None


def test_missing_config_names_the_alternatives():
    with pytest.raises(FileNotFoundError, match="available: .*smollm2-135m"):
        _configs.config_path("models", "no-such-model.yaml")


@pytest.mark.parametrize("name", GROUPS.get("models", []))
def test_model_default_layer_is_inside_the_model(name):
    from mup.models import NAMED_CONFIGS

    data = _configs.load_config("models", f"{name}.yaml")
    if "named_config" not in data:
        pytest.skip(f"{name} has no named_config to check its layer against")
    config = NAMED_CONFIGS[data["named_config"]]
    assert 0 <= data["layer"] <= config.n_layers


@pytest.mark.parametrize("name", GROUPS.get("models", []))
def test_model_baseline_prompt_is_a_known_template(name):
    from mup.monitors._prompts import LIKELIHOOD_TEMPLATES

    chosen = _configs.load_config("models", f"{name}.yaml").get("baseline_prompt")
    if chosen is None:
        pytest.skip(f"{name} names no baseline_prompt (the CLI falls back to single_word)")
    assert set(str(chosen).split(",")) <= set(LIKELIHOOD_TEMPLATES)
