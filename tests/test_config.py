"""params.yaml → typed config: profiles, defaults, and errors that name the key and the file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from show1.config import ConfigError, Size, apply_environment_defaults, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load_for_both_profiles():
    tiny = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params.yaml", profile="paper")
    assert tiny.profile == "tiny" and paper.profile == "paper"
    assert [s.key for s in tiny.curate.clip.sizes] == ["64x40", "256x160"]
    assert [s.key for s in paper.curate.clip.sizes] == ["64x40", "256x160", "576x320"]
    assert tiny.curate.clip.stride == 2 and paper.curate.clip.stride == 29
    assert tiny.curate.clip.frames == paper.curate.clip.frames == 29


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "curate:\n  filtres:\n    min_fps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and "'curate.filtres'" in message and "did you mean 'filters'" in message


def test_mistyped_value_names_key(tmp_path):
    path = write(tmp_path, "curate:\n  clip:\n    fps: fast\n")
    with pytest.raises(ConfigError, match=r"key 'curate\.clip\.fps'"):
        load_params(path)


def test_error_in_inactive_profile_is_reported_with_its_path(tmp_path):
    path = write(tmp_path, "profile: tiny\nprofiles:\n  paper:\n    curate:\n      clip:\n        frmes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'profiles\.paper\.curate\.clip\.frmes'"):
        load_params(path)


def test_unknown_profile_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_params(write(tmp_path, "profile: huge\n"))
    with pytest.raises(ConfigError, match=r"profiles\.medium"):
        load_params(write(tmp_path, "profiles:\n  medium: {}\n"))


def test_profile_override_merges_deeply(tmp_path):
    path = write(tmp_path, "curate:\n  clip: {frames: 8, fps: 4}\nprofiles:\n  paper:\n    curate:\n"
                           "      clip: {frames: 16}\n")
    paper = load_params(path, profile="paper")
    assert paper.curate.clip.frames == 16 and paper.curate.clip.fps == 4  # fps kept from the shared section
    assert load_params(path).curate.clip.frames == 8


def test_sizes_accept_pairs_and_strings_and_reject_nonsense(tmp_path):
    params = load_params(write(tmp_path, "curate:\n  clip:\n    sizes: [[32, 20], '64x40']\n"))
    assert params.curate.clip.sizes == [Size(width=32, height=20), Size(width=64, height=40)]
    with pytest.raises(ConfigError, match="sizes"):
        load_params(write(tmp_path, "curate:\n  clip:\n    sizes: [[32, 20, 3]]\n"))
    with pytest.raises(ConfigError, match="repeat"):
        load_params(write(tmp_path, "curate:\n  clip:\n    sizes: [[32, 20], '32x20']\n"))


def test_inverted_ranges_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="min_fps"):
        load_params(write(tmp_path, "curate:\n  filters: {min_fps: 60, max_fps: 30}\n"))


def test_missing_explicit_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "curate: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(write(tmp_path, "- a list\n"))


def test_torch_threads_sleep_while_they_wait_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # every default this sets is gone after the test
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    apply_environment_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    apply_environment_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    # OpenMP reads it once, when torch loads: the CLI and the flows set it before anything imports torch.
    for module in ("show1.cli", "flows"):
        done = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.stdout.strip() == "False", (module, done.stderr)
