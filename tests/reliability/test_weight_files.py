"""Broken or foreign weights are never sealed: `show1 convert-weights` checks every safetensors header against its
file and refuses links out of the source folder, leaving no --out behind; the same header check refuses a
truncated file before anything loads it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from show1.cli import app
from show1.integrity import CHECKSUMS
from show1.weight_files import DamagedWeightsError, check_folder, safetensors_problem

runner = CliRunner()
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def tiny_safetensors(path: Path) -> bytes:
    """A real safetensors file with every kind of entry the check must size right (an empty tensor, bfloat16,
    bool, metadata); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(4, dtype=torch.bfloat16),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 5)},
              str(path), metadata={"format": "pt"})
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def with_entry(data: bytes, name: str, **changes) -> bytes:
    header, body = split(data)
    header[name] = header[name] | changes
    return join(header, body)


def _offsets(data: bytes, name: str) -> list[int]:
    return split(data)[0][name]["data_offsets"]


# name -> (damage done to a whole file, what the refusal says)
DAMAGE = {
    "truncated data": (lambda d: d[:-7], "truncated: its tensors need"),
    "truncated header": (lambda d: d[:20], "truncated: its header is"),
    "shorter than the length field": (lambda d: d[:5], "too short for the 8-byte header length"),
    "empty file": (lambda d: b"", "truncated: 0 bytes"),
    "header not JSON": (lambda d: join(b"{'weight': nope}", split(d)[1]), "its header is not JSON"),
    "header not UTF-8": (lambda d: join(b'{"\xff": 1}', split(d)[1]), "its header is not JSON"),
    "header a list": (lambda d: join(b"[1, 2]", b""), "its header is not a JSON object"),
    "absurd header length": (lambda d: (2 ** 40).to_bytes(8, "little") + d[8:], "beyond the 100000000-byte limit"),
    "dtype x shape != bytes": (lambda d: with_entry(d, "weight", shape=[2, 4]),
                               "'weight': F32 × [2, 4] is 32 bytes but its data_offsets span 24"),
    "overlapping offsets": (lambda d: with_entry(with_entry(d, "weight", shape=[2, 2], data_offsets=[0, 16]),
                                                 "bias", data_offsets=[12, 20]), "overlaps the tensor before it"),
    "offsets past the end": (lambda d: with_entry(d, "mask", data_offsets=[_offsets(d, "mask")[0] + 8,
                                                                           _offsets(d, "mask")[1] + 8]),
                             "there is a gap before it"),
    "bytes after the last tensor": (lambda d: d + b"\0" * 3, "3 stray bytes after the last tensor"),
    "unknown dtype": (lambda d: with_entry(d, "weight", dtype="F31"), "unknown dtype 'F31'"),
    "negative offset": (lambda d: with_entry(d, "weight", data_offsets=[-24, 0]), "are not [begin, end]"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_header_check_names_what_is_wrong_and_the_loader_agrees_the_file_is_broken(damage, tmp_path):
    whole = tiny_safetensors(tmp_path / "whole.safetensors")
    assert safetensors_problem(whole, len(whole)) is None, "a file safetensors wrote is refused"
    spoil, reason = DAMAGE[damage]
    broken = spoil(whole)
    problem = safetensors_problem(broken, len(broken))
    assert problem is not None and reason in problem, problem
    (tmp_path / "broken.safetensors").write_bytes(broken)
    with pytest.raises(SafetensorError):  # never stricter than the library: what it refuses, it cannot load
        load_file(str(tmp_path / "broken.safetensors"))


def test_the_header_check_accepts_what_the_library_loads(tmp_path):
    """Padding the library allows (spaces around the JSON) and a header without metadata are not damage."""
    whole = tiny_safetensors(tmp_path / "whole.safetensors")
    header, body = split(whole)
    del header["__metadata__"]
    for variant in (join(b"  " + json.dumps(header).encode() + b"    ", body), join(header, body)):
        (tmp_path / "v.safetensors").write_bytes(variant)
        assert set(load_file(str(tmp_path / "v.safetensors"))) == {"weight", "bias", "mask", "empty"}
        assert safetensors_problem(variant, len(variant)) is None


def published_folder(root: Path) -> Path:
    """A stage folder as published weights come: config, safetensors and one pickle to convert, no seal."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "Show1BasePipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    tiny_safetensors(root / WEIGHTS)
    (root / "vae").mkdir()
    torch.save({"w": torch.ones(3)}, root / "vae" / "diffusion_pytorch_model.bin")
    return root


def assert_one_line_refusal(result, *names: object) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]


@pytest.mark.parametrize("damage", ["truncated data", "header not JSON", "overlapping offsets",
                                    "dtype x shape != bytes"])
def test_convert_weights_refuses_a_damaged_safetensors_file_and_writes_nothing(damage, tmp_path):
    source = published_folder(tmp_path / "published")
    weights = source / WEIGHTS
    weights.write_bytes(DAMAGE[damage][0](weights.read_bytes()))
    out = tmp_path / "out" / "safe"
    result = runner.invoke(app, ["convert-weights", str(source), "--out", str(out)])
    assert_one_line_refusal(result, weights, DAMAGE[damage][1].split(":")[0], "damaged safetensors file")
    assert not out.exists() and not (tmp_path / "out").exists(), "a refused conversion left output behind"


def test_convert_weights_over_an_existing_copy_leaves_it_whole_when_refused(tmp_path):
    source = published_folder(tmp_path / "published")
    out = tmp_path / "safe"
    assert runner.invoke(app, ["convert-weights", str(source), "--out", str(out)]).exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file() and (out / CHECKSUMS).is_file()
    (source / WEIGHTS).write_bytes((source / WEIGHTS).read_bytes()[:-1])
    result = runner.invoke(app, ["convert-weights", str(source), "--out", str(out), "--overwrite"])
    assert_one_line_refusal(result, source / WEIGHTS, "truncated")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left"
    assert check_folder(out, sealed=True)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_convert_weights_refuses_a_link_out_of_the_source_folder(link, tmp_path):
    source = published_folder(tmp_path / "published")
    secrets = tmp_path / "home"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("PRIVATE KEY")
    if link == "file":
        path, target = source / "unet" / "notes.txt", secrets / "id_rsa"
    else:
        path, target = source / "text_encoder", secrets
    os.symlink(target, path)
    out = tmp_path / "safe"
    result = runner.invoke(app, ["convert-weights", str(source), "--out", str(out)])
    assert_one_line_refusal(result, path, target, "symbolic link")
    assert not out.exists()
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                   and not p.is_symlink() and p != secrets / "id_rsa")


def test_convert_weights_copies_links_that_stay_inside_the_folder(tmp_path):
    source = published_folder(tmp_path / "published")
    os.symlink("config.json", source / "unet" / "config-copy.json")
    os.symlink("unet", source / "unet-alias")
    out = tmp_path / "safe"
    result = runner.invoke(app, ["convert-weights", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    copied = out / "unet" / "config-copy.json"
    assert not copied.is_symlink() and copied.read_text() == '{"sample_size": 8}'
    assert (out / "unet-alias" / "diffusion_pytorch_model.safetensors").read_bytes() == (source / WEIGHTS).read_bytes()
    assert check_folder(out, sealed=True)


def test_convert_weights_refuses_a_link_that_loops(tmp_path):
    source = published_folder(tmp_path / "published")
    os.symlink("..", source / "unet" / "up")
    result = runner.invoke(app, ["convert-weights", str(source), "--out", str(tmp_path / "safe")])
    assert_one_line_refusal(result, source / "unet" / "up", "a folder that holds it")
    assert not (tmp_path / "safe").exists()


def test_an_unsealed_folder_with_a_truncated_file_is_refused_before_loading(tmp_path):
    """Published weights have no seal: the header check alone stands between a cut download and the loader; a
    folder sealed over a truncated file (what convert-weights used to write) is refused the same way."""
    folder = published_folder(tmp_path / "published")
    (folder / "vae" / "diffusion_pytorch_model.bin").unlink()
    check_folder(folder)
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-10])
    named = rf"^{re.escape(str(folder / WEIGHTS))}: damaged safetensors file \(truncated"
    with pytest.raises(DamagedWeightsError, match=named):
        check_folder(folder, parts=["unet"])
    check_folder(folder, parts=["vae"])  # a stage that does not load the unet is not held up by it
    from show1.integrity import seal

    seal(folder)
    with pytest.raises(DamagedWeightsError, match="truncated"):
        check_folder(folder, sealed=True)
