"""Shared fixtures: a tiny random model folder and projects that use it."""

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from studio.core.tiny import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    """A project on the tiny model with four eval prompts; closed at teardown."""
    from studio.core import store

    project = store.Project.create(tmp_path / "project", base_model={"kind": "folder", "path": str(tiny_model_dir)})
    store.add_dataset(project.db, "eval", "prompts", [
        {"prompt": [{"role": "user", "content": text}]}
        for text in ("Say hi.", "Name a colour.", "What is 2+2?", "Be brief.")], is_eval=True)
    yield project
    project.close()


@pytest.fixture
def make_toy_run(monkeypatch, project):
    """Registers the toy engine (tests/toy_engine.py) and returns make(**overrides) -> a new run id.

    The registry travels to child processes, so runs trained there find the toy engine too.
    """
    from studio.core import runs

    monkeypatch.setitem(runs.ENGINE_MODULES, "toy", "tests.toy_engine")

    def make(**overrides) -> int:
        config = runs.make_config("toy", {"max_steps": 6, "checkpoint_every": 3, "eval_max_new_tokens": 2,
                                          **overrides})
        return runs.create_run(project.db, config)

    return make
