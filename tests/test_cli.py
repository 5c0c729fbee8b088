"""The ``leanquant`` command line: user errors are one line on stderr and exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import user_error

from leanquant.cli import main

NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"
FAST = ["--nsamples", "4", "--seqlen", "32", "--group-size", "32"]


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


# Bad input refused up front, in the library (the CLI only reports it): each test runs the
# CLI and, where there is one, the Python API.


@pytest.mark.parametrize(
    "name,content",
    [("empty.txt", ""), ("blank.txt", "\n \n\n"), ("records.jsonl", '{"text": ""}\n')],
)
def test_text_without_text(capsys, tiny_model, tmp_path, name, content):
    text, model = tmp_path / name, tiny_model("llama")
    text.write_text(content)
    msg = user_error(capsys, quantize(model, tmp_path / "out", "--calib", str(text), *FAST))
    assert f"text source {text} holds no text" in msg
    msg = user_error(capsys, ["eval", str(model), "--data", str(text), "--seqlen", "32"])
    assert f"text source {text} holds no text" in msg
    assert sorted(tmp_path.iterdir()) == [text]


def test_unreadable_text(capsys, tiny_model, tmp_path):
    text = tmp_path / "bad.jsonl"
    text.write_text('{"text": "the of and"\n')
    msg = user_error(
        capsys, quantize(tiny_model("llama"), tmp_path / "out", "--calib", str(text), *FAST)
    )
    assert f"cannot read {text}" in msg


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--nsamples", "0"),
        ("--nsamples", "-4"),
        ("--seqlen", "0"),
        ("--seqlen", "-32"),
        ("--batch-size", "0"),
        ("--T", "0"),
    ],
)
def test_quantize_counts_must_be_positive(capsys, tiny_model, calib_text, tmp_path, flag, value):
    argv = quantize(tiny_model("llama"), tmp_path / "out", "--calib", str(calib_text), *FAST)
    msg = user_error(capsys, [*argv, flag, value])
    assert f"{flag} must be a positive integer, got {value}" in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--seqlen", "0", "--seqlen must be a positive integer, got 0"),
        ("--seqlen", "1", "--seqlen must be at least 2 to score a token, got 1"),
        ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
        ("--max-windows", "0", "--max-windows must be a positive integer, got 0"),
        ("--max-windows", "-1", "--max-windows must be a positive integer, got -1"),
    ],
)
def test_eval_counts_must_be_positive(capsys, tiny_model, calib_text, flag, value, expected):
    argv = ["eval", str(tiny_model("llama")), "--data", str(calib_text), "--seqlen", "32"]
    assert expected in user_error(capsys, [*argv, flag, value])


def test_counts_are_checked_by_the_library(tmp_path):
    from quantizer.errors import UserError
    from quantizer.evaluate import EvalJob
    from quantizer.gptq import GPTQSettings
    from quantizer.pipeline import QuantizeJob

    settings = GPTQSettings(
        bits=4, group_size=-1, fit="minmax", actorder=False, static_groups=False
    )
    for field in ("nsamples", "seqlen", "batch_size", "max_shard_bytes"):
        with pytest.raises(UserError, match="must be a positive integer, got 0"):
            QuantizeJob(tmp_path, tmp_path / "out", settings, **{field: 0})
    for field in ("seqlen", "batch_size", "max_windows"):
        with pytest.raises(UserError, match="must be a positive integer, got 0"):
            EvalJob(tmp_path, **{field: 0})
    with pytest.raises(UserError, match="--nsamples must be a positive integer, got 2.5"):
        QuantizeJob(tmp_path, tmp_path / "out", settings, nsamples=2.5)
    with pytest.raises(ValueError, match="--T must be a positive integer, got 0"):
        GPTQSettings(bits=4, T=0, group_size=-1, fit="minmax", actorder=False, static_groups=False)


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--damp", "0", "--damp must be a positive finite number, got 0.0"),
        ("--damp", "-0.01", "--damp must be a positive finite number, got -0.01"),
        ("--damp", "nan", "--damp must be a positive finite number, got nan"),
        ("--damp", "inf", "--damp must be a positive finite number, got inf"),
        ("--shrink", "0.5", "--shrink must be at least 0 and below 0.5, got 0.5"),
        ("--shrink", "-0.1", "--shrink must be at least 0 and below 0.5, got -0.1"),
        ("--exponent", "nan", "--exponent must be a finite number, got nan"),
    ],
)
def test_gptq_settings_are_validated_up_front(capsys, tiny_model, tmp_path, flag, value, expected):
    from quantizer.gptq import GPTQSettings

    model = tiny_model("llama")
    assert expected in user_error(capsys, quantize(model, tmp_path / "out", "--rtn", flag, value))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=expected.replace("--", "")):
        GPTQSettings(
            bits=4,
            **{flag.removeprefix("--"): float(value)},
            group_size=-1,
            fit="minmax",
            actorder=False,
            static_groups=False,
        )


def _without_tokenizer(model: Path, to: Path) -> Path:
    to.mkdir()
    for f in model.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_model_without_tokenizer(capsys, tiny_model, calib_text, tmp_path):
    model = _without_tokenizer(tiny_model("llama"), tmp_path / "model")
    msg = user_error(capsys, quantize(model, tmp_path / "out", "--calib", str(calib_text), *FAST))
    assert f"no usable tokenizer in {model}" in msg and "calibration" in msg and "--rtn" in msg
    assert not (tmp_path / "out").exists()
    msg = user_error(capsys, ["eval", str(model), "--data", str(calib_text), "--seqlen", "32"])
    assert f"no usable tokenizer in {model}" in msg and "evaluation" in msg
    # Round to nearest needs no tokenizer.
    assert main(quantize(model, tmp_path / "out", "--rtn", "--group-size", "32")) == 0


def test_tokenizer_ids_beyond_the_vocabulary(capsys, tokenizer, calib_text, tmp_path):
    """The model's embedding has fewer rows than the tokenizer has ids."""
    from conftest import ARCHITECTURES
    from transformers import AutoModelForCausalLM

    from quantizer.data import load_text, tokenize

    model, vocab = tmp_path / "model", 200
    AutoModelForCausalLM.from_config(ARCHITECTURES["llama"](vocab)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    top = int(tokenize(tokenizer, load_text(str(calib_text))).max())
    assert top >= vocab
    expected = f"produces token id {top} but the model's vocab_size is {vocab}"
    msg = user_error(capsys, quantize(model, tmp_path / "out", "--calib", str(calib_text), *FAST))
    assert expected in msg
    msg = user_error(capsys, ["eval", str(model), "--data", str(calib_text), "--seqlen", "32"])
    assert expected in msg


def test_seqlen_beyond_the_model_positions(capsys, tiny_model, calib_text, tmp_path):
    model = tiny_model("llama")  # max_position_embeddings 256
    argv = quantize(model, tmp_path / "out", "--calib", str(calib_text), *FAST, "--seqlen", "257")
    msg = user_error(capsys, argv)
    assert "--seqlen 257" in msg and "max_position_embeddings 256" in msg
    msg = user_error(capsys, ["eval", str(model), "--data", str(calib_text), "--seqlen", "300"])
    assert "--seqlen 300" in msg and "max_position_embeddings 256" in msg
    assert list(tmp_path.iterdir()) == []


def test_seqlen_unchecked_without_max_positions(tmp_path):
    from transformers import PretrainedConfig

    from quantizer.data import check_seqlen

    check_seqlen(10**6, PretrainedConfig(), tmp_path)  # no field: nothing to refuse


def test_json_records_without_a_text_field(capsys, tiny_model, tmp_path):
    """One line on stderr and nothing else (datasets' progress bar is off while it reads)."""
    text = tmp_path / "chat.jsonl"
    text.write_text('{"content": "the of and"}\n{"content": "model weight"}\n')
    code = main(quantize(tiny_model("llama"), tmp_path / "out", "--calib", str(text), *FAST))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        f"leanquant: error: {text}: records need a 'text' field or a 'messages' list "
        "(found ['content'])"
    )


@pytest.mark.parametrize(
    "argv,says",
    [
        (["quantize", "m", "o", "--bits", "5"], "argument --bits: invalid choice: 5"),
        (["quantize"], "the following arguments are required: model, out"),
        (["bogus"], "argument command: invalid choice: 'bogus'"),
    ],
)
def test_usage_errors_are_one_line_too(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("leanquant: error: ") and says in err[0]


@pytest.mark.parametrize(
    "arch,flags,want",
    [
        ("qwen3_moe", ["--rtn", "--moe-calibration", "routed"], "--moe-calibration routed needs "
         "calibration (the tokens the router sends each expert); it does nothing with --rtn"),
        ("qwen3_moe", ["--rtn", "--moe-min-tokens", "5", "--moe-calibration", "routed"],
         "--moe-calibration routed and --moe-min-tokens 5 need calibration"),
        ("qwen2", ["--moe-min-tokens", "5", "--calib", "wiki-sample", *FAST],
         "--moe-min-tokens 5: {model} has no Mixture-of-Experts layers (fused experts); it does "
         "nothing for this model"),
        ("gemma3", ["--moe-calibration", "routed", "--rtn", "--group-size", "32"],
         "it does nothing with --rtn"),
    ],
)  # fmt: skip
def test_moe_flags_where_they_do_nothing_are_refused(
    capsys, tiny_model, tmp_path, arch, flags, want
):
    model, out = tiny_model(arch), tmp_path / "out"
    msg = user_error(capsys, quantize(model, out, *flags))
    assert want.format(model=model) in msg
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # their defaults, given explicitly, are not refused
    assert (
        main(quantize(model, out, "--rtn", "--moe-calibration", "all", "--group-size", "32")) == 0
    )


def test_quantize_summary_says_what_was_quantized_and_kept(capsys, tiny_model, tmp_path):
    """Mixtral, 2 layers of 4 experts: 4 attention + 12 expert linears per layer, a router."""
    out = tmp_path / "out"
    assert main(quantize(tiny_model("mixtral"), out, "--rtn", "--group-size", "32")) == 0
    lines = capsys.readouterr().out.splitlines()
    # RTN's loss is Σ (w − q)², not GPTQ's loss error: its own label, here and in the report
    assert "; total weight error (unweighted) " in lines[0] and "loss error" not in lines[0]
    assert lines[1] == (
        "quantized 32 linears (24 of them expert linears); kept 16-bit besides embeddings, "
        "norms and head: 2 routers"
    )
    assert lines[2].startswith("weight error per layer (unweighted): 0: ")
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["loss_measure"].startswith("total weight error (unweighted)")
    assert report["expert_linears"] == 24
    assert sum(len(layer) for layer in report["layers"]) == 32
    # checkpoint names in `skipped`, as in `layers` and modules_to_not_convert
    assert [s["name"] for s in report["skipped"]] == [
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)
    ]
    assert (
        "model.layers.0.block_sparse_moe.gate"
        in json.loads((out / "config.json").read_text())["quantization_config"][
            "modules_to_not_convert"
        ]
    )


def test_quantize_summary_of_a_multimodal_wrapper_names_the_towers(  # 3 layers x 7 linears
    capsys, tiny_model, calib_text, tmp_path
):
    out = tmp_path / "out"
    flags = ["--calib", str(calib_text), *FAST, "--skip", r"mlp\.down_proj"]
    assert main(quantize(tiny_model("gemma3"), out, *flags)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "; total loss error " in lines[0]
    assert lines[1] == (
        "quantized 18 linears; kept 16-bit besides embeddings, norms and head: 3 by --skip, "
        "vision_tower, multi_modal_projector (outside the text decoder)"
    )
    assert lines[2].startswith("loss error per layer: 0: ")
    report = json.loads((out / "quantize_report.json").read_text())
    assert "loss_measure" not in report and "expert_linears" not in report
    skipped = {s["name"]: s for s in report["skipped"]}
    assert {n for n, s in skipped.items() if s["why"] == "--skip"} == {
        f"language_model.model.layers.{i}.mlp.down_proj" for i in range(3)
    }
    towers = {n: s for n, s in skipped.items() if "parameters" in s}
    assert set(towers) == {"vision_tower", "multi_modal_projector"}
    assert all(s["parameters"] > 0 for s in towers.values())
