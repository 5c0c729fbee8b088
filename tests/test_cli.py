"""The ``leanquant`` command line: user errors are one line on stderr and exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quantizer.cli import main

NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"
FAST = ["--nsamples", "4", "--seqlen", "32", "--group-size", "32"]


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error; returns its one-line message."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("leanquant: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def quantize(model: Path, out: Path, *flags: str) -> list[str]:
    return ["quantize", str(model), str(out), *flags]


def test_missing_model_folder(capsys, tmp_path):
    msg = user_error(capsys, quantize(tmp_path / "nowhere", tmp_path / "out", "--rtn"))
    assert "nowhere" in msg and "does not exist" in msg
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    msg = user_error(capsys, quantize(tmp_path / "model", tmp_path / "out", "--rtn"))
    assert "no config.json" in msg


def test_unsupported_architecture(capsys, tiny_model, tmp_path):
    msg = user_error(capsys, quantize(tiny_model("gpt2"), tmp_path / "out", "--rtn"))
    assert "unsupported architecture GPT2LMHeadModel" in msg and "Conv1D" in msg
    assert list(tmp_path.iterdir()) == []


def test_unsupported_bits(capsys, tiny_model, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(quantize(tiny_model("llama"), tmp_path / "out", "--rtn", "--bits", "5"))
    assert e.value.code == 2
    assert "--bits" in capsys.readouterr().err


def test_group_size_must_divide_in_features(capsys, tiny_model, tmp_path):
    msg = user_error(
        capsys, quantize(tiny_model("llama"), tmp_path / "out", "--rtn", "--group-size", "48")
    )
    assert "model.layers.0.self_attn.q_proj" in msg and "in_features 64" in msg


def test_nan_weight_is_named(capsys, tiny_model, tmp_path):
    model = tiny_model("llama", nan_in=NAN_TENSOR)
    msg = user_error(capsys, quantize(model, tmp_path / "out", "--rtn", "--group-size", "32"))
    assert NAN_TENSOR in msg and "NaN" in msg and "--resume" in msg
    # Layer 0 had finished: its partial run is kept (hidden) for --resume, no "out" folder.
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]


def test_nan_embedding_is_named(capsys, tiny_model, calib_text, tmp_path):
    model = tiny_model("llama", nan_in="model.embed_tokens.weight")
    msg = user_error(capsys, quantize(model, tmp_path / "out", "--calib", str(calib_text), *FAST))
    assert "model.embed_tokens.weight" in msg and "NaN" in msg


def test_existing_output_needs_overwrite(capsys, tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    msg = user_error(capsys, quantize(tiny_model("llama"), tmp_path / "out", "--rtn"))
    assert "exists" in msg and "--overwrite" in msg


def test_calibration_text_shorter_than_a_window(capsys, tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the of and to in\n")
    msg = user_error(
        capsys,
        quantize(
            tiny_model("llama"),
            tmp_path / "out",
            "--calib",
            str(short),
            "--seqlen",
            "64",
            "--nsamples",
            "2",
            "--group-size",
            "32",
        ),
    )
    assert "fewer than one window of --seqlen 64" in msg
    assert list(tmp_path.iterdir()) == [short]


def test_nonuniform_needs_per_row_grids(capsys, tiny_model, tmp_path):
    msg = user_error(
        capsys,
        quantize(
            tiny_model("llama"),
            tmp_path / "out",
            "--rtn",
            "--grid",
            "nonuniform",
            "--group-size",
            "32",
        ),
    )
    assert "--group-size -1" in msg


def perplexity(capsys, model: Path, text: Path) -> float:
    assert (
        main(
            [
                "eval",
                str(model),
                "--data",
                str(text),
                "--seqlen",
                "32",
                "--max-windows",
                "8",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 8 and result["tokens"] == 8 * 32
    return result["perplexity"]


def test_quantize_then_eval(capsys, tiny_model, calib_text, tmp_path):
    model, out = tiny_model("qwen2"), tmp_path / "out"
    assert main(quantize(model, out, "--calib", str(calib_text), *FAST)) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} ")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    quantized, original = perplexity(capsys, out, calib_text), perplexity(capsys, model, calib_text)
    assert math.isfinite(quantized) and 1 < quantized
    # A random tiny model is close to uniform over its vocabulary; 4 bits keep it there.
    assert abs(math.log(quantized / original)) < 0.1, (quantized, original)
