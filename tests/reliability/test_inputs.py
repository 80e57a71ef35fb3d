"""Bad input is one line: exit code 2, one `error:` line on stderr naming the option or file, no traceback, and
nothing started. Prompts and files that are not UTF-8, prompts of control characters only, seeds torch cannot take,
denoising steps out of range; `show1 run` checks everything it will read before it curates anything.

Real processes, as a person runs them: invalid UTF-8 in an argument reaches Python only through a real argv.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from show1.config import ConfigError, load_params
from show1.evaluation.prompts import load_prompt_set
from show1.inputs import SEED_LIMIT, InputError, check_prompt, shown
from show1.preflight import check_run_inputs

REPO = Path(__file__).resolve().parents[2]


def show1(cwd: Path, *args: str | bytes, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "show1.cli", *args], cwd=cwd, capture_output=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line a usage error prints; asserts exit code 2 and that nothing else was printed."""
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == 2, stderr + result.stdout.decode()
    assert "Traceback" not in stderr and result.stdout == b"", stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "\x1b" not in stderr and "\x07" not in stderr, "input was echoed to the terminal unescaped"
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with its own params.yaml and a manifest: whatever a run writes would land here."""
    (tmp_path / "clips.csv").write_text("video,caption\nclip.mp4,a red kite over a beach\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"manifest": str(tmp_path / "clips.csv")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
    }))
    (tmp_path / "bad.txt").write_bytes(b"a red kite over a beach\n# a comment\nle caf\xe9 au lait\n")
    (tmp_path / "controls.txt").write_text("a red kite over a beach\n\n\x1b\x07\x7f \x1b\n")
    return tmp_path


@pytest.mark.parametrize(("args", "named"), [
    ([b"\x1b[2Ja cat \xff\xfe"], "the prompt is not valid UTF-8 (byte 0xff at character 11 of "
                                 "'\\x1b[2Ja cat \\xff\\xfe')"),
    (["\x1b\x07\x7f"], "the prompt is empty (only control characters: '\\x1b\\x07\\x7f')"),
    (["   "], "the prompt is empty"),
    (["--prompts", "bad.txt"], "--prompts: bad.txt: line 3 is not valid UTF-8 (byte 0xe9)"),
    (["--prompts", "controls.txt"], "--prompts: controls.txt line 3 is empty (only control characters: "
                                    "'\\x1b\\x07\\x7f \\x1b')"),
    (["--prompts", "missing.txt"], "--prompts: prompt set 'missing.txt': not a file"),
    (["a cat", "--seed", "-1"], f"--seed -1: a seed is a whole number from 0 to {SEED_LIMIT - 1}"),
    (["a cat", "--seed", str(SEED_LIMIT)], f"--seed {SEED_LIMIT}: a seed is a whole number"),
    (["--prompts", "demo", "--seed", "-1"], "--seed -1"),
    (["a cat", "--steps", "0"], "--steps 0: denoising steps are a whole number from 1 to 1000"),
    (["a cat", "--steps", "5000"], "--steps 5000"),
    (["a cat", "--steps", "many"], "Invalid value for '--steps'"),
    (["a cat", "--fps", "0"], "--fps 0.0"),
    (["a cat", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["a cat", "--no-such-option"], "No such option: --no-such-option"),
])
def test_generate_bad_input_is_one_line_before_any_model_loads(project, args, named):
    # --weights-dir does not exist: a message about it would mean the input was checked after loading began
    result = show1(project, "generate", *args, "--weights-dir", "no-weights-here", timeout=60)
    line = one_error_line(result)
    assert named in line and "no-weights-here" not in line, line


def test_a_seed_that_overflows_for_a_later_video_of_a_prompt_file_is_refused(project):
    (project / "two.txt").write_text("a red kite\na paper boat\n")
    line = one_error_line(show1(project, "generate", "--prompts", "two.txt", "--seed", str(SEED_LIMIT - 1)))
    assert f"--seed {SEED_LIMIT - 1}" in line and "video 2 uses seed + 1" in line


def test_init_weights_refuses_a_negative_seed_and_writes_nothing(project):
    line = one_error_line(show1(project, "init-weights", "--out", "weights", "--seed", "-3"))
    assert "--seed -3" in line and not (project / "weights").exists()


@pytest.mark.parametrize(("content", "named"), [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe binary", "not a text file (not valid UTF-8 at byte"),
    (b"train:\n  seed: [1, 2\n", "not valid YAML: line 3, column 1: expected ',' or ']'"),
    (b"evaluate:\n  seed: -1\n", "key 'evaluate.seed': Input should be greater than or equal to 0"),
    (b"evaluate:\n  steps: {sr1: 5000}\n", "denoising steps must be from 1 to 1000"),
])
def test_a_params_file_that_cannot_be_used_is_one_line_naming_it(project, content, named):
    (project / "broken.yaml").write_bytes(content)
    before = sorted(p.name for p in project.iterdir())
    line = one_error_line(show1(project, "--params", "broken.yaml", "run", "--no-wait"))
    assert line.startswith("error: broken.yaml: ") and named in line, line
    assert sorted(p.name for p in project.iterdir()) == before


def test_a_file_name_with_markup_and_escapes_is_printed_as_it_is(project):
    line = one_error_line(show1(project, "--params", "[/]\x1b[31m.yaml", "validate"))
    assert line == "error: [/]\\x1b[31m.yaml: params file not found"


@pytest.mark.parametrize(("args", "named"), [
    (["--prompts", "/missing.txt"], "--prompts: prompt set '/missing.txt': not a file, nor one of the shipped sets"),
    (["--prompts", "bad.txt"], "--prompts: bad.txt: line 3 is not valid UTF-8"),
    (["--manifest", "missing.csv"], "--manifest: missing.csv: manifest not found"),
])
def test_show1_run_checks_its_inputs_before_it_curates_trains_or_locks(project, args, named):
    """A missing prompt file used to be found after 89 s of curation, training and registration."""
    before = sorted(p.name for p in project.iterdir())
    started = time.monotonic()
    result = show1(project, "--params", "params.yaml", "run", "--no-wait", *args)
    seconds = time.monotonic() - started
    line = one_error_line(result)
    assert named in line, line
    assert seconds < 30, f"show1 run took {seconds:.0f} s to refuse its input"  # ~0.3 s: no flow, no Prefect
    assert sorted(p.name for p in project.iterdir()) == before  # no data/curated, runs/, mlruns/, lock, eval/


def test_the_up_front_check_names_each_input_show1_run_reads(project):
    params = load_params(project / "params.yaml")
    check_run_inputs(params)  # the demo prompts and the project's manifest: nothing to say
    (project / "nocaption.csv").write_text("video\nclip.mp4\n")
    with pytest.raises(InputError, match=r"^--manifest: .*nocaption.csv: no 'caption' column"):
        check_run_inputs(params, project / "nocaption.csv")
    with pytest.raises(InputError, match=r"^evaluate.prompts: .*controls.txt line 3 is empty"):
        check_run_inputs(params.model_copy(update={"evaluate": params.evaluate.model_copy(
            update={"prompts": str(project / "controls.txt")})}))
    # The demo set has 3 prompts: evaluate.seed + 2 must still be a seed.
    late_seed = params.evaluate.model_copy(update={"seed": SEED_LIMIT - 2})
    with pytest.raises(InputError, match=r"^evaluate.seed \d+: .*video 3 uses seed \+ 2"):
        check_run_inputs(params.model_copy(update={"evaluate": late_seed}))
    i3d = params.evaluate.model_copy(update={"i3d": project / "i3d.pt"})
    with pytest.raises(InputError, match=r"^evaluate.i3d .*i3d.pt: file not found"):
        check_run_inputs(params.model_copy(update={"evaluate": i3d}))
    first_frame = params.sampling.model_copy(update={"first_frame_model": project / "IF-II-L"})
    with pytest.raises(InputError, match=r"^sampling.first_frame_model .*IF-II-L: not a model folder"):
        check_run_inputs(params.model_copy(update={"sampling": first_frame}))


def test_prompt_files_are_utf8_lines_and_each_bad_line_is_named(tmp_path):
    crlf = tmp_path / "windows.txt"
    crlf.write_bytes(b"\xef\xbb\xbfa red kite\r\n\r\n# comment\r\nle caf\xc3\xa9 au lait  # inline\r\n")
    assert load_prompt_set(crlf).prompts == ("a red kite", "le café au lait")  # BOM and CRs dropped
    (tmp_path / "latin1.txt").write_bytes(b"one\ntwo\ncaf\xe9\n")
    with pytest.raises(InputError, match=r"latin1.txt: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        load_prompt_set(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*folder' \(a folder\): not a file"):
        load_prompt_set(tmp_path / "folder")


def test_echoed_input_cannot_drive_the_terminal():
    assert shown("\x1b]0;title\x07 \u202eevil\\") == "'\\x1b]0;title\\x07 \\u202eevil\\\\'"
    assert shown("caf\udce9") == "'caf\\xe9'"  # an undecodable argv byte shows as the byte it was
    assert shown("x" * 100, limit=10) == f"'{'x' * 10}'…"
    assert check_prompt("a cat\tin a hat") == "a cat\tin a hat"  # control characters among words stay
    with pytest.raises(InputError, match=r"^prompts.txt line 2 is empty \(only control characters: '\\x00'\)"):
        check_prompt("\x00", "prompts.txt line 2")


def test_params_seeds_are_seeds_torch_takes(tmp_path):
    (tmp_path / "p.yaml").write_text(f"evaluate:\n  seed: {SEED_LIMIT}\n")
    with pytest.raises(ConfigError, match=r"key 'evaluate\.seed'"):
        load_params(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("train:\n  seed: -1\n")
    with pytest.raises(ConfigError, match=r"key 'train\.seed'"):
        load_params(tmp_path / "p.yaml")
