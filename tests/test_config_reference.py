"""docs/configuration.md is generated from the dataclasses; it must match them."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_config_reference.py"


def _module():
    spec = importlib.util.spec_from_file_location("make_config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_current():
    module = _module()
    assert module.main(["--check"]) == 0, "run: python scripts/make_config_reference.py"


def test_every_field_of_every_config_is_documented_with_help():
    module = _module()
    page = module.PAGE.read_text()
    for _, target in module.CONFIGS:
        for f in module._own_fields(module._load(target)):
            assert f"| `{f.name}` |" in page, f"{target}.{f.name} missing from {module.PAGE.name}"
            assert f.metadata.get("help"), f"{target}.{f.name} has no help text"
