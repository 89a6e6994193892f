"""Regenerate the known-flag lists of the hand-off engines (run by hand when a pinned version changes).

    python tests/data/handoff/extract_flags.py OPENRLHF_REPO VERL_REPO   # git clones; TRL from the installed trl

OpenRLHF: every option string of `add_argument` in its CLI scripts at the tag (f-string prefixes expanded).
verl: every dotted key of the generated PPO trainer config at the tag (what a Hydra override may set).
TRL: every field of the dataclasses `trl dpo` parses (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig).
"""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
OPENRLHF_TAG, VERL_TAG = "v0.11.0", "v0.7.0"


def git_show(repo: str, tag: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True, text=True).stdout


def commit(repo: str, tag: str) -> str:
    return subprocess.run(["git", "-C", repo, "rev-list", "-n1", tag], check=True, capture_output=True, text=True).stdout.strip()


def argparse_flags(source: str) -> list[str]:
    prefixes = re.findall(r"for prefix in \(([^)]*)\)", source)
    expanded = [p.strip().strip("\"'") for group in prefixes for p in group.split(",") if p.strip()]
    flags = set()
    for flag in re.findall(r"add_argument\(\s*f?\"(--[^\"]+)\"", source):
        flags.update(flag.replace("{prefix}", p) for p in expanded) if "{prefix}" in flag else flags.add(flag)
    return sorted(flags)


def yaml_keys(node, prefix="") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys += yaml_keys(value, path + ".")
    return keys


def write(name: str, header: str, flags: list[str]) -> None:
    (HERE / name).write_text(f"# {header}\n" + "\n".join(flags) + "\n")


def main(openrlhf: str, verl: str) -> None:
    for script in ("train_dpo", "train_ppo_ray"):
        source = git_show(openrlhf, OPENRLHF_TAG, f"openrlhf/cli/{script}.py")
        write(f"openrlhf-{script}.txt", f"OpenRLHF {OPENRLHF_TAG} ({commit(openrlhf, OPENRLHF_TAG)}) "
              f"openrlhf/cli/{script}.py argparse option strings", argparse_flags(source))
    config = yaml.safe_load(git_show(verl, VERL_TAG, "verl/trainer/config/_generated_ppo_trainer.yaml"))
    write("verl-main_ppo.txt", f"verl {VERL_TAG} ({commit(verl, VERL_TAG)}) verl/trainer/config/"
          "_generated_ppo_trainer.yaml keys (Hydra override paths)", yaml_keys(config))
    import trl
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments

    fields = sorted({f.name for c in (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig)
                     for f in dataclasses.fields(c)})
    write("trl-dpo.txt", f"TRL {trl.__version__} `trl dpo` config keys (ScriptArguments, DPOConfig, ModelConfig, "
          "DatasetMixtureConfig fields)", fields)


if __name__ == "__main__":
    main(*sys.argv[1:3])
