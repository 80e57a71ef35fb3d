"""Hostile inputs, generated: prompts, params files and manifests that Hypothesis makes up. Whatever they hold, show1
answers with one clear line (an InputError, a ConfigError, a ManifestError) or a row in quarantine, never a
traceback; a params file that DVC rewrites keeps every value's meaning; a manifest row is screened or chunked, once.

Each property runs a fixed, modest number of examples, derandomized so that every CI run tries the same ones;
SHOW1_FUZZ_EXAMPLES=500 (the on-demand soak) tries more, and new ones each run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.hydra import apply_overrides, to_hydra_overrides
from dvc.utils.serialize._yaml import dumps_yaml
from hydra.errors import OverrideParseException
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from show1 import atomic
from show1.cli import app
from show1.config import ConfigError, Params, load_params, read_yaml
from show1.data import sources
from show1.data.contracts import ContractError, manifest_frame
from show1.data.curate import finalize, plan_curation, quarantine_row
from show1.data.errors import REASONS, ManifestError, Rejected
from show1.data.manifest import read_manifest
from show1.inputs import (
    MAX_STEPS,
    SEED_LIMIT,
    InputError,
    check_prompt,
    check_seed,
    check_steps,
    printable,
    shown,
    visible,
)
from show1.preflight import check_manifest

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

EXAMPLES = int(os.environ.get("SHOW1_FUZZ_EXAMPLES", "25"))


def fuzz(scale: float = 1.0) -> settings:
    """`scale` × EXAMPLES examples; repeatable (derandomized) at the default count, new ones in the soak."""
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None, derandomize=EXAMPLES <= 25,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                          HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the examples of a property write their files into, one after the other."""
    return tmp_path_factory.mktemp("hostile")


def one_clean_line(message: str) -> bool:
    """One line, every character printable: nothing in it can move a terminal's cursor or recolour it."""
    return all(c.isprintable() for c in message)


def undecodable(text: str) -> bool:
    """Holds a byte that was not UTF-8 (Python's surrogate escape of argv and file names)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


# ------------------------------------------------------------------------------------------------ prompts

# Control characters, terminal escapes, bidi overrides, invisible characters, undecodable argv bytes (U+DC80 …
# U+DCFF) and lone surrogates that no decoder gives.
HOSTILE_CHARS = ("\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x7f\x85\x9b\xa0\xad\u061c\u200b\u200e\u200f\u202a\u202e"
                 "\u2028\u2029\u2066\u2069\u3000\ufeff\ufffd\\'\" \udc80\udc9b\udcc3\udcff\ud800\udbff\udc00")
PROMPTS = st.one_of(
    st.text(max_size=40),
    st.text(st.one_of(st.characters(), st.sampled_from(HOSTILE_CHARS)), max_size=40),
    st.text(st.sampled_from(HOSTILE_CHARS), max_size=12),
    st.sampled_from(["", " ", "\x1b[2J\x1b[H", "\x1b]0;pwned\x07", "a cat\x1b[31m in red", "\u202egnp.exe", "\t\n",
                     "caf\udcc3\udca9 au lait", "\udcff", "a red kite over a beach", "a\nb", "\x00a kite"]),
    st.tuples(st.sampled_from(["a kite ", "\x1b", "\udcff", " "]), st.integers(100, 20_000)).map(lambda t: t[0] * t[1]),
)


@fuzz(8)
@given(prompt=PROMPTS, what=st.sampled_from(["the prompt", "prompts.txt line 3"]))
def test_a_prompt_is_taken_unchanged_or_refused_in_one_printable_line_naming_it(prompt, what):
    bad = undecodable(prompt) or not visible(prompt)
    try:
        taken = check_prompt(prompt, what)
    except InputError as exc:
        message = str(exc)
        assert bad, f"{prompt!r} refused: {message}"
        assert message.startswith(f"{what} is "), message
        assert one_clean_line(message), f"{message!r} holds a control character or a line break"
        assert len(message) < 1000, "the echoed prompt is not cut short"
    else:
        assert not bad, f"{prompt!r} taken: not UTF-8, or nothing to read in it"
        assert taken == prompt


@fuzz(8)
@given(text=PROMPTS, limit=st.integers(0, 100))
def test_shown_input_is_one_printable_quoted_line_and_printable_keeps_only_line_breaks(text, limit):
    echoed = shown(text, limit)
    assert one_clean_line(echoed), echoed
    assert echoed.startswith("'") and echoed.endswith("'" if len(text) <= limit else "'…")
    if all(c.isprintable() and c != "\\" for c in text[:limit]) and not undecodable(text):
        assert echoed[1:echoed.rindex("'")] == text[:limit], "a harmless text was changed"
    safe = printable(f"error: {text}")
    assert all(c.isprintable() or c == "\n" for c in safe), safe
    assert safe.count("\n") == text.count("\n")


@fuzz(4)
@given(seed=st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([-1, 0, SEED_LIMIT - 1, SEED_LIMIT])),
       count=st.integers(1, 5000), steps=st.one_of(st.integers(-(2 ** 40), 2 ** 40), st.integers(-2, MAX_STEPS + 2)))
def test_a_seed_or_a_number_of_steps_is_taken_or_refused_in_one_line_naming_the_option(seed, count, steps):
    fits = seed >= 0 and seed + count - 1 < SEED_LIMIT
    try:
        assert check_seed(seed, count=count) == seed and fits
    except InputError as exc:
        assert not fits and str(exc).startswith(f"--seed {seed}: ") and one_clean_line(str(exc))
    try:
        assert check_steps(steps) == steps and 1 <= steps <= MAX_STEPS
    except InputError as exc:
        assert not 1 <= steps <= MAX_STEPS and str(exc).startswith(f"--steps {steps}: ") and one_clean_line(str(exc))


@fuzz(1)
@given(prompt=PROMPTS)
def test_show1_generate_answers_a_generated_prompt_with_one_error_line_before_any_work(prompt):
    """A bad prompt is refused first; a good one gets as far as the next input, a video name show1 cannot write
    (checked before params, torch or a model loads): either way one `error:` line, exit code 2."""
    result = runner.invoke(app, ["generate", "--out", "video.txt", "--no-track", "--", prompt])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert one_clean_line(lines[0]), f"{lines[0]!r}: input echoed unescaped"
    if undecodable(prompt) or not visible(prompt):
        assert lines[0].startswith("error: the prompt is "), lines[0]
    else:
        assert lines[0].startswith("error: --out video.txt: "), lines[0]


# ------------------------------------------------------------------------------------------------- params

# Strings that YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml, DVC) read differently, or that need quotes to stay text.
TRICKY = ["no", "No", "NO", "off", "Off", "yes", "on", "ON", "y", "n", "Y", "N", "true", "False", "null", "Null", "~",
          "", " ", "1e-4", "1E5", "1.0e+3", "0o10", "010", "0x1F", "0b101", ".5", "5.", "+1", "-0", "1_000", "1:20",
          "12:30:45", "2024-01-01", "2001-12-14t21:59:43.10-05:00", ".inf", "-.inf", ".nan", "nan", "inf", "=", "<<",
          "!tag", "&a", "*a", "#", "- x", "a: b", "@x", "`x`", "'", '"', "%TAG", "---", "...", "?", "{}", "[]", "x #y",
          "fp16", "bf16", "sqlite:///mlruns/mlflow.db", "C:\\runs", "caf\u00e9", "\u202eevil"]
TEXT = st.one_of(st.sampled_from(TRICKY), st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12))
SCALARS = st.one_of(TEXT, st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.booleans(), st.none())


def typed(value: Any) -> Any:
    """`value` with every scalar's type made part of it: True ≠ 1 ≠ 1.0 ≠ "1", and NaN equal to NaN."""
    if isinstance(value, dict):  # keys too, but a text key stays as it is (easier to look up)
        return {k if isinstance(k, str) else typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return type(value).__name__, repr(value)


@fuzz(4)
@given(doc=st.dictionaries(TEXT, st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                                           st.dictionaries(TEXT, SCALARS, max_size=4)), max_size=6))
def test_params_written_by_dvcs_yaml_writer_read_back_with_the_same_types_and_values(doc):
    text = dumps_yaml(doc)  # how DVC writes params.yaml (ruamel.yaml, round-trip mode, YAML 1.2)
    assert typed(read_yaml(text)) == typed(doc), text


def set_key(text: str, section: str, key: str, literal: str) -> str:
    """params.yaml `text` with `section.key` (a key of a top-level section) set to `literal`, as a person edits it."""
    lines, current = text.split("\n"), None
    for index, line in enumerate(lines):
        if line[:1].isalpha():
            current = line.split(":")[0]
        elif current == section and re.match(rf"  {key}:", line):
            lines[index] = f"  {key}: {literal}"
            return "\n".join(lines)
    raise KeyError(f"{section}.{key}")


def quoted(text: str) -> st.SearchStrategy[str]:
    """`text` as a YAML scalar that holds it as text: double-quoted (JSON escapes are YAML's), or single-quoted."""
    single = ["'" + text.replace("'", "''") + "'"] if text.isprintable() else []
    return st.sampled_from([json.dumps(text), *single])


def number(value: float | int) -> st.SearchStrategy[str]:
    """The ways a person writes `value` in YAML 1.2."""
    if isinstance(value, int):
        return st.sampled_from([str(value), f"+{value}", hex(value), f"0o{value:o}"])
    return st.sampled_from([repr(value), f"{value:e}", f"{value:E}", f"{value:g}", f"{value:.12f}".rstrip("0")])


# params.yaml keys and the literals a person writes for them.
EDITS = {
    ("train", "mixed_precision"): st.sampled_from(["no", "fp16", "bf16"]).flatmap(
        lambda v: st.sampled_from([v, f'"{v}"', f"'{v}'"])),
    ("train", "fsdp"): st.sampled_from(["true", "false", "True", "FALSE"]),
    ("train", "learning_rate"): st.floats(1e-9, 10.0).flatmap(number),
    ("train", "weight_decay"): st.floats(0.0, 1.0).flatmap(number),
    ("train", "max_steps"): st.integers(1, 10 ** 7).flatmap(number),
    ("tracking", "experiment"): TEXT.flatmap(quoted),
    ("evaluate", "prompts"): TEXT.flatmap(quoted),
    ("paths", "runs"): TEXT.flatmap(quoted),
}


def outcome(path: Path) -> Any:
    """What show1 makes of a params file: its settings, or its error."""
    try:
        return typed(load_params(path).model_dump(mode="json"))
    except ConfigError as exc:
        return f"ConfigError: {exc}"


@fuzz(1)
@given(edits=st.fixed_dictionaries({}, optional=EDITS), seed=st.integers(0, 2 ** 32 - 1))
def test_a_dvc_exp_run_set_param_rewrite_changes_only_the_parameter_it_sets(edits, seed, scratch):
    """`dvc exp run -S train.seed=N` loads params.yaml with ruamel.yaml and writes it back as YAML 1.2: the quotes
    of `"no"` and of every other string 1.2 reads as text go. show1 reads the rewritten file as it read the one a
    person wrote, the parameter set aside."""
    text = (REPO / "params.yaml").read_text()
    for (section, key), literal in edits.items():
        text = set_key(text, section, key, literal)
    path = scratch / "params.yaml"
    path.write_text(text)
    before, settings_before = read_yaml(text), outcome(path)

    apply_overrides(path, [f"train.seed={seed}"])  # what `dvc exp run -S` runs before the pipeline
    after = read_yaml(path.read_text())
    assert after["train"]["seed"] == seed
    before["train"]["seed"] = seed
    assert typed(after) == typed(before), path.read_text()
    if isinstance(settings_before, dict):
        settings_before["train"]["seed"] = typed(seed)
    assert outcome(path) == settings_before


@fuzz(1)
@given(key=st.sampled_from(["tracking.experiment", "evaluate.prompts", "evaluate.limit", "train.learning_rate",
                            "train.max_steps", "train.mixed_precision"]),
       value=st.one_of(st.sampled_from(TRICKY), st.integers(0, 10 ** 6).map(str), st.floats(0, 10).map(repr),
                       st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=8)))
def test_the_value_dvc_exp_run_set_param_writes_is_the_value_show1_reads(key, value, scratch):
    """`-S key=VALUE`: hydra reads VALUE (`no` is text, `true` a bool, `1e-4` a float), DVC writes it with ruamel.yaml,
    and show1 reads back exactly what hydra read."""
    try:
        meant = to_hydra_overrides([f"{key}={value}"])[0].value()
    except OverrideParseException:
        assume(False)
    assume(isinstance(meant, str | int | float | bool) or meant is None)
    path = scratch / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, [f"{key}={value}"])
    written: Any = read_yaml(path.read_text())
    for part in key.split("."):
        written = written[part]
    assert typed(written) == typed(meant), f"-S {key}={value}: DVC wrote {path.read_text()}"


SECTIONS = {name: list(getattr(field.annotation, "model_fields", {})) for name, field in Params.model_fields.items()}
KEYS = sorted({k for keys in SECTIONS.values() for k in keys} | {"tiny", "paper", "base", "sr1", "x"})
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=6)
DOCS = st.dictionaries(st.sampled_from([*SECTIONS, "profiles", "junk"]),
                       st.one_of(SCALARS, st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)), max_size=4)
HOSTILE_YAML = [
    "train: " + "[" * 3000 + "]" * 3000,  # nested deeper than the parser's stack
    "train: {seed: " + "9" * 5000 + "}",  # an integer with more digits than Python converts
    "train: &a [*a]", "train: &a {train: *a}\nprofiles: {tiny: {train: *a}}", "train: &a {x: *a}",
    "!!python/object/apply:os.system ['true']", "train: !!python/name:os.system", "train: !!binary aGk=",
    "--- a\n--- b\n", "\ufeffprofile: tiny\n", "profile: [tiny]", "profile: {tiny: 1}", "profiles: [tiny]",
    "profiles: {tiny: [1]}", "profiles: {null: {}}", "profiles: {tiny: {profile: paper}}", "1: 2", "? [a]\n: 1",
    "train: {seed: .nan}", "train: {learning_rate: .inf}", "<<: {train: {}}", "train:\n  <<: {seed: 1}",
    "%YAML 1.1\n---\ntrain: {}", "&a a: b", "\t- x", "train: {mixed_precision: no}", "evaluate: {steps: {base: x}}",
    "evaluate: {steps: [1]}", "evaluate: {stages: [sr2]}", "train_per_stage: {base: {nope: 1}}",
    "curate: {clip: {sizes: [[1]]}}", "curate: {clip: {sizes: x}}", "paths: {runs: null}", "train: {seed: 0x}",
    "train: {seed: 2024-13-45}",  # a date that is none
]


def settings_or_config_error(path: Path, content: bytes) -> None:
    """Write `content` to `path` and load it: settings, or a ConfigError every line of which names the file."""
    path.write_bytes(content)
    try:
        load_params(path)
    except ConfigError as exc:
        assert all(line.startswith(f"{path}: ") for line in str(exc).splitlines()), str(exc)


@pytest.mark.parametrize("text", HOSTILE_YAML, ids=[f"yaml{i}" for i in range(len(HOSTILE_YAML))])
def test_a_hostile_params_file_gives_settings_or_a_config_error_naming_the_file(text, scratch):
    settings_or_config_error(scratch / "params.yaml", text.encode())


@fuzz(4)
@given(content=st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(str.encode),
    DOCS.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()), DOCS.map(lambda d: dumps_yaml(d).encode())))
def test_any_params_file_gives_settings_or_a_config_error_naming_the_file(content, scratch):
    settings_or_config_error(scratch / "params.yaml", content)


# ---------------------------------------------------------------------------------------------- manifests

# Where a row's video may point: files in the manifest's folder, escapes from it, schemes curation does not take,
# and paths or URLs no file can have.
INSIDE = ["videos/a.mp4", "./videos/b.mp4", "videos/../videos/a.mp4", "videos//a.mp4", " videos/a.mp4 ",
          "videos/caf\u00e9 clip.mp4", "videos/\udcff.mp4", "{root}/videos/a.mp4", "videos/dir.mp4",
          "videos/missing.mp4", "videos/loop.mp4", "videos/a.mp4?x=1", "http://example.invalid/v.mp4"]
ESCAPES = ["videos/link.mp4", "../outside/secret.mp4", "{outside}/secret.mp4", "/etc/passwd", "~/x.mp4",
           "package://skvideo/../../../outside/secret.mp4", "package://nope/x.mp4", "package://", "package://skvideo/",
           "package:///etc/passwd", "%2e%2e/outside/secret.mp4", "//[x/a.mp4"]
SCHEMES = ["ftp://host/x.mp4", "file:///etc/passwd", "data:video/mp4;base64,AAAA", "javascript:alert(1)",
           "https://[::1/v.mp4", "http://[x", "s3://bucket/v.mp4", "C:\\videos\\a.mp4", "\\\\server\\share\\a.mp4"]
BROKEN = ["", " ", "\x00", "videos/a.mp4\x00.txt", "a" * 300 + ".mp4", "videos/" + "b/" * 3000, "videos/\u202e4pm.exe",
          "videos/a.mp4\n", "videos/\ud800.mp4", "~nosuchuser-show1/x.mp4"]
VIDEOS = INSIDE + ESCAPES + SCHEMES + BROKEN
CAPTIONS = ["a red kite over a beach", "", " ", "ab", "x" * 600, "<b></b>", "\x00\x01\x02binary\x03\x04",
            "\ufffd" * 5, "caf\u00e9 au lait", "line\nbreak in a caption", 'quote " , comma, caption',
            "a lone \ud800 surrogate", "an escaped \udc80 byte", "=cmd|' /C calc'!A0 a formula"]
NASTY = ["", " ", ",", '"', '""', "\n", "\r\n", "\x00", "\ufeff", "\\", "#", "nan", "inf", "-1", "1e309", "0", "2",
         "1.5", "abc", "train", "val", " VAL ", "test", "\ud800", "\udcff", "null", "[]", "{}"]
FIELD = st.one_of(st.sampled_from(NASTY), st.text(max_size=10))
TIME = st.one_of(st.sampled_from(["0", "1.5", "2", ""]), FIELD)
JSON_ONLY = st.one_of(st.booleans(), st.none(), st.integers(-(2 ** 80), 2 ** 80), st.floats(),
                      st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), FIELD, max_size=2))
VIDEO = st.one_of(*map(st.sampled_from, (INSIDE, ESCAPES, SCHEMES, BROKEN)), FIELD)
CLEAN_ROWS = st.fixed_dictionaries({"video": VIDEO, "caption": st.just(CAPTIONS[0])})  # only the video to judge
ROWS = st.fixed_dictionaries(
    {"video": VIDEO, "caption": st.one_of(st.sampled_from(CAPTIONS), FIELD)},
    optional={"id": st.one_of(st.sampled_from(["a", "b", "../../up", ".hidden", "x/y", "1"]), FIELD),
              "start": TIME, "end": TIME, "split": st.one_of(st.sampled_from(["train", "val", " VAL "]), FIELD),
              "contentUrl": st.sampled_from(VIDEOS), "name": FIELD,
              "extra": FIELD, "": FIELD})
JUNK = st.one_of(st.binary(max_size=16), st.sampled_from([
    b'"unbalanced, quote', b"\xff\xfe\x00", b"\x00", b"a,b,c,d,e,f,g,h,i,j,k,l", b"[1, 2]", b"null", b"{", b'"text"',
    b'{"video": ' + b"[" * 3000 + b"]" * 3000 + b', "caption": "deep"}', b'{"video": "videos/a.mp4", "caption": "cut',
    b'{"video": "videos/a.mp4", "caption": "\\ud800\\u0000 escapes"}', b"\r", b"\\", b"\xef\xbb\xbf", b"\t\t"]))


def encoded(text: str) -> bytes:
    """`text` as bytes; a lone surrogate becomes the invalid UTF-8 a broken writer leaves."""
    return text.encode("utf-8", "surrogatepass")


@st.composite
def manifests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A manifest file's name and bytes: generated rows (missing and extra columns, hostile values) written as CSV,
    TSV or JSONL, with junk lines (binary, unbalanced quotes, deep JSON) put anywhere."""
    suffix = draw(st.sampled_from([".csv", ".jsonl", ".csv", ".jsonl", ".tsv", ".csv", ".jsonl", ".txt"]))
    if draw(st.integers(0, 9)) == 0:  # a whole file that is no manifest
        return suffix, draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\n\n", b"video,caption\n", b"\x00" * 8,
                                             b"video,video\na,b\n", b'{"caption": "x"}\n', b"[]\n"]))
    rows = draw(st.lists(st.one_of(ROWS, CLEAN_ROWS, st.dictionaries(st.sampled_from(["video", "caption", "id", "x"]),
                                                               FIELD)), min_size=1, max_size=8))
    if suffix == ".jsonl":
        rows = [{k: draw(st.one_of(st.just(v), JSON_ONLY)) for k, v in row.items()} if draw(st.booleans()) else row
                for row in rows]  # numbers, lists, objects where text belongs
        chunks = [encoded(json.dumps(row, ensure_ascii=draw(st.booleans()))) + b"\n" for row in rows]
    else:
        header = list(dict.fromkeys(k for row in rows for k in row)) or ["video", "caption"]
        no_video = [k for k in header if k not in ("video", "contentUrl")]  # and a column name with a line break
        header = draw(st.sampled_from([header] * 5 + [header + header[:1], [*header, "vid\neo"], header[1:],
                                                      [*no_video, "vid\x1b[2J\neo"]]))
        ending = draw(st.sampled_from(["\n", "\r\n"]))

        def line(values: list[Any]) -> bytes:
            buffer = io.StringIO()
            csv.writer(buffer, delimiter="\t" if suffix == ".tsv" else ",", lineterminator=ending).writerow(values)
            return encoded(buffer.getvalue())

        chunks = [line(header)]
        for row in rows:
            values = [row.get(k, "") for k in header]
            shape = draw(st.sampled_from(["whole", "whole", "whole", "short", "long"]))  # a field missing or extra
            chunks.append(line(values[:-1] if shape == "short" else [*values, draw(FIELD)] if shape == "long"
                               else values))
    for junk in draw(st.lists(JUNK, max_size=3)):
        chunks.insert(draw(st.integers(0, len(chunks))), junk + b"\n")
    return suffix, draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + b"".join(chunks)


# Text a JSON string or a quoted CSV field may hold as it is: line and paragraph separators and NEL, which
# str.splitlines() splits at, quotes, commas, the delimiters, CR and LF.
RAW = "\x85\u2028\u2029\x1c\x1d\x1e\x0b\x0c\r\n\t,\"' "


CELL = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(RAW)), max_size=8)


@fuzz(2)
@given(captions=st.lists(st.tuples(CELL, st.sampled_from(RAW), CELL).map("".join), min_size=1, max_size=6),
       suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]), bom=st.booleans())
def test_a_well_formed_manifest_reads_back_row_for_row(captions, suffix, bom, scratch):
    """However odd the text in its fields, a manifest written by a CSV or JSON writer is read as the rows it holds:
    none split in two, none lost, every caption as written (a NUL, as undecodable bytes, reads as U+FFFD)."""
    rows = [{"id": f"r{i}", "video": f"videos/{i}.mp4", "caption": caption} for i, caption in enumerate(captions)]
    if suffix == ".jsonl":  # every other row with its text unescaped
        text = "".join(json.dumps(row, ensure_ascii=i % 2 == 1) + "\n" for i, row in enumerate(rows))
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["id", "video", "caption"], delimiter="\t" if suffix == ".tsv" else ",",
                                lineterminator="\r\n")  # RFC 4180: the writer then quotes fields with a CR or LF
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    path = scratch / f"manifest{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" * bom + text.encode("utf-8"))
    read = read_manifest(path)
    assert [(r.id, r.caption) for r in read] == [(row["id"], row["caption"].replace("\x00", "\ufffd"))
                                                 for row in rows]
    assert all(r.rejection is None for r in read), [r.rejection for r in read]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest folder: a few files under videos/ (never decoded here), a folder named like a video, a link to a
    file outside (that file beside the folder) and a link to itself."""
    base = tmp_path_factory.mktemp("hostile-manifests")
    videos = base / "root" / "videos"
    videos.mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "caf\u00e9 clip.mp4", "\udcff.mp4"):  # \udcff: a name with the byte 0xff
        (videos / name).write_bytes(b"not a video: curation's decoding is not run here")
    (videos / "dir.mp4").mkdir()
    (base / "outside").mkdir()
    (base / "outside" / "secret.mp4").write_bytes(b"outside the manifest folder")
    (videos / "link.mp4").symlink_to(base / "outside" / "secret.mp4")
    (videos / "loop.mp4").symlink_to(videos / "loop.mp4")
    return base / "root"


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


PATH_REASONS = {"path_outside_root", "unsupported_scheme", "missing_file"}


@fuzz(4)
@given(manifest=manifests())
@example(manifest=(".jsonl", b'{"video": ' + b"[" * 3000 + b"]" * 3000 + b', "caption": "nested too deep"}\n'
                             b'{"video": "videos/a.mp4", "caption": "a red kite over a beach"}\n'))
@example(manifest=(".jsonl", b'{"video": "videos/\\udcff.mp4", "caption": "a red kite \\ud800 over a beach"}\n'
                             b'{"video": "videos/a\\u0000.mp4", "caption": "a red kite over a beach"}\n'
                             b'{"video": "videos/b.mp4", "caption": "\\ud800\\u0000 escapes", "id": "\\udfff"}\n'))
@example(manifest=(".csv", b"video,caption\nhttp://[x,a red kite over a beach\n~nosuchuser-show1/x.mp4,a kite flies\n"
                           b"videos/loop.mp4,a kite in a loop\n" + b"a" * 300 + b".mp4,a red kite over a beach\n"))
@example(manifest=(".csv", b'caption,"vid\x1b[2J\neo"\na red kite over a beach,x\n'))
def test_any_manifest_is_one_error_or_every_row_screened_or_chunked_exactly_once(manifest, corpus):
    suffix, content = manifest
    content = content.replace(b"{outside}", str(corpus.parent / "outside").encode()).replace(
        b"{root}", str(corpus).encode())
    path = corpus / f"manifest{suffix}"
    path.write_bytes(content)
    params = Params.model_validate({"curate": {"rows_per_shard": 2}})
    out = corpus.parent / "curated"
    try:
        rows = read_manifest(path, params.curate.columns)
    except ManifestError as exc:  # the file as a whole: not found, no rows, no video column, unknown format
        assert str(exc).startswith(f"{path}: "), str(exc)
        with pytest.raises(ManifestError):
            plan_curation(path, out, params)
        with pytest.raises(ContractError):
            manifest_frame(path, params)
        with pytest.raises(InputError) as refused:
            check_manifest(params, path)
        assert refused.value.args[0].startswith("--manifest: ") and "\n" not in str(refused.value), (
            f"{refused.value!r}: more than one line")
        return
    check_manifest(params, path)
    assert [r.row for r in rows] == list(range(len(rows)))

    plan = plan_curation(path, out, params)
    chunked = [r for index in range(plan.chunk_count) for r in plan.chunk(index)]
    assert sorted([r.row for r in chunked] + list(plan.screened)) == list(range(len(rows))), "a row lost or doubled"
    assert {r.reason for r in plan.screened.values()} <= set(REASONS)
    for row in rows:
        if row.rejection is not None:
            assert plan.screened[row.row].reason == row.rejection.reason
    ids = [r.id for r in chunked if r.id is not None]
    assert len(ids) == len(set(ids)), "two chunked rows share an id"
    assert len(set(plan.source_ids.values())) == len(plan.source_ids)
    assert all("/" not in s and not s.startswith(".") for s in plan.source_ids.values())
    packages = [sources.package_root(p) for p in params.curate.allowed_packages]
    for row in chunked:
        assert row.rejection is None and row.video
        if sources.is_url(row.video):
            assert plan.stamps[row.row] is None
        else:  # nothing outside the manifest's folder (or an allowed package), nothing missing, reaches a chunk
            found = sources.resolve_local(row.video, corpus, [], params.curate.allowed_packages)
            assert found.is_file() and any(inside(found, root) for root in [corpus.resolve(), *packages]), found
    assert len(plan.fingerprints) == plan.chunk_count
    # Whatever a row holds can be written to quarantine.jsonl (UTF-8 JSON): as screened now, or as a chunk rejects it.
    by_row = {r.row: r for r in rows}
    atomic.jsonl_bytes(quarantine_row(by_row[row], rejection) for row, rejection in plan.screened.items())
    atomic.jsonl_bytes(quarantine_row(row, Rejected("undecodable", f"{row.video}: ?")) for row in chunked)
    if plan.chunk_count == 0:  # nothing to decode: the refused curation's quarantine holds every row
        summary = finalize(plan)
        quarantined = (out / "refused" / "quarantine.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
        assert summary.rejected_rows == len(rows) == len(quarantined)

    frame = manifest_frame(path, params)
    assert len(frame) == len(rows)
    assert frame["row_error"].notna().tolist() == [r.rejection is not None for r in rows]
    video_errors = frame["video_error"].notna().tolist()
    for row in chunked:
        assert not video_errors[row.row], f"row {row.row} is chunked, yet its video has an error"
    for number, rejection in plan.screened.items():
        if rejection.reason in PATH_REASONS and by_row[number].rejection is None:
            assert video_errors[number], f"row {number} screened ({rejection.reason}), no video_error"


def test_the_generated_manifests_reach_every_outcome(corpus):
    """The generator is worth its time: over a fixed sample, whole-file errors, rows of their own rejection, rows
    screened by path and rows chunked all occur."""
    params = Params()
    seen: set[str] = set()

    @fuzz(2)
    @given(manifest=manifests())
    def sample(manifest: tuple[str, bytes]) -> None:
        suffix, content = manifest
        path = corpus / f"sample{suffix}"
        path.write_bytes(content)
        try:
            plan = plan_curation(path, corpus.parent / "curated", params)
        except ManifestError:
            seen.add("file")
            return
        seen.update(r.reason for r in plan.screened.values())
        seen.update(["chunked"] if plan.chunked else [])

    sample()
    assert {"file", "chunked", "malformed_row", "path_outside_root", "missing_file", "unsupported_scheme"} <= seen, seen
