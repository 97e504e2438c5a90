"""The README's (and docs') commands use real subcommands and real config keys."""
import dataclasses
import os
import re

from estimator.config import Config
import mmrecall_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/serving.md", "run_train.sh")


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _readme():
    return _read("README.md")


def test_set_keys_in_docs_are_config_fields():
    keys = [k for name in DOCS for k in re.findall(r"--set '?([A-Za-z_]+)=", _read(name))
            if k != "key"]                          # "--set key=value" is the placeholder
    assert len(keys) >= 7, keys
    unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(Config)})
    assert unknown == [], f"docs set unknown config keys {unknown}"


def test_mmrecall_subcommands_in_readme_exist():
    commands = set(re.findall(r"^\s*mmrecall ([a-z-]+)", _readme(), re.M))
    commands |= set(re.findall(r"`mmrecall ([a-z-]+)", _readme()))
    assert {"generate", "prep", "train", "export", "rank", "score"} <= commands
    assert commands <= set(mmrecall_cli.SUBCOMMANDS), sorted(commands - set(mmrecall_cli.SUBCOMMANDS))
